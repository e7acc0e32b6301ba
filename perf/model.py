"""Byte and FLOP models for instance norm, plus the CSV schema.

Kept free of torch/triton imports so that plots and summaries can be redrawn
from a CSV on any machine (and so that importing this never imports Triton
before ``perf.report`` had the chance to set ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import math

# The CSV schema: exactly these columns, in this order.
CSV_COLUMNS = [
    "device", "torch", "triton", "date", "shape_class", "shape", "dtype",
    "direction", "provider", "ms", "gbps", "pct_of_roof",
]

DIRECTIONS = ["forward", "backward", "forward+backward"]
DTYPES = ["float32", "bfloat16", "float16"]
# Normalization providers; "copy" is the measured memory roof.
NORM_PROVIDERS = ["triton_instnorm", "torch_eager", "torch_compile"]
# Other Triton instance-norm kernels (perf/peers.py): measured when their package imports here,
# otherwise reported as unavailable with the reason.
PEER_PROVIDERS = ["flag_gems", "liger_groupnorm"]
ROOF_PROVIDER = "copy"
PROVIDERS = NORM_PROVIDERS + PEER_PROVIDERS + [ROOF_PROVIDER]
# What triton_instnorm's speedup is computed against (summary columns, speedup plot).
BASELINES = ["torch_eager", "torch_compile"] + PEER_PROVIDERS

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# Statistics kept per plane for the backward: what triton_instnorm's forward stores (pivot,
# inv_scale, mean, var; kernels/constants.py), so that the model counts what the kernels move.
STATS_PER_PLANE = 4
STATS_ITEMSIZE = 4  # float32 statistics (float64 input is not benchmarked)

# FLOPs per element of x, counted in the fp32 math every implementation does:
#   forward : sum for mean (1), centered square + sum for var (3),
#             (x - mean) * rstd (2), * weight + bias (2)            -> 8
#   backward: recompute x_hat (2), dy*w (1), two plane reductions
#             sum(dy*w) and sum(dy*w*x_hat) (3), dx = rstd*(g - a - x_hat*b)
#             (4), dweight/dbias partial sums (2)                   -> 12
FLOPS_PER_ELEMENT = {"forward": 8, "backward": 12}
FLOPS_PER_ELEMENT["forward+backward"] = FLOPS_PER_ELEMENT["forward"] + FLOPS_PER_ELEMENT["backward"]


def shape_to_str(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def shape_from_str(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def numel(shape) -> int:
    return math.prod(shape)


def plane_elements(shape) -> int:
    """Elements per (n, c) plane: the reduction length of instance norm."""
    return math.prod(shape[2:])


def norm_bytes(shape, dtype: str, direction: str) -> int:
    """Minimum DRAM traffic of one instance-norm call, in bytes.

    forward : read x, write y                      (+ weight, bias, write the statistics)
    backward: read x and dy, write dx              (+ weight, read the statistics,
                                                      write dweight, dbias)
    forward+backward: the sum of both.
    The per-channel / per-plane terms are tiny next to the tensor terms but are
    counted so that tiny_planes shapes (49 or 16 elements per plane) are fair.
    """
    if direction == "forward+backward":
        return norm_bytes(shape, dtype, "forward") + norm_bytes(shape, dtype, "backward")
    size = ITEMSIZE[dtype]
    n, c = shape[0], shape[1]
    tensor = numel(shape) * size
    params = 2 * c * size           # weight + bias (or dweight + dbias)
    stats = STATS_PER_PLANE * n * c * STATS_ITEMSIZE
    if direction == "forward":
        return 2 * tensor + params + stats
    if direction == "backward":
        return 3 * tensor + c * size + params + stats
    raise ValueError(f"unknown direction {direction!r}")


def copy_bytes(shape, dtype: str) -> int:
    """``y.copy_(x)``: read x once, write y once."""
    return 2 * numel(shape) * ITEMSIZE[dtype]


def bytes_for(provider: str, shape, dtype: str, direction: str) -> int:
    if provider == ROOF_PROVIDER:
        return copy_bytes(shape, dtype)
    return norm_bytes(shape, dtype, direction)


def flops_for(shape, direction: str) -> int:
    return FLOPS_PER_ELEMENT[direction] * numel(shape)


def gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


# Peak fp32 non-tensor-core throughput (TFLOP/s) of known devices, matched by
# substring of torch.cuda.get_device_name(), most specific first.  Instance
# norm computes in fp32 whatever the storage dtype, so the fp32 vector peak is
# the relevant compute roof for every dtype.
PEAK_FP32_TFLOPS = [
    ("H100 PCIe", 51.2),
    ("H100 NVL", 60.0),
    ("H100", 66.9),   # SXM5
    ("H200", 66.9),
    ("GH200", 66.9),
    ("A100", 19.5),
    ("L40S", 91.6),
    ("A10G", 31.2),
    ("RTX 4090", 82.6),
]


def known_peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_FP32_TFLOPS:
        if key in device_name:
            return tflops
    return None


def slugify(name: str) -> str:
    """File-name slug of a device name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    out = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name.strip())
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_") or "unknown_device"
