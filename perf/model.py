"""The minimum bytes and the FLOPs of an instance-norm call, and the roofs (torch-free).

With ``s`` the element size, ``numel`` the tensor size and ``N x C`` planes:

- forward: read x, write y (``2 numel s``), read weight and bias (``2 C s``), write the
  statistics the backward needs (``STATS_PER_PLANE`` float32 values per plane);
- backward: read x and dy, write dx (``3 numel s``), read weight, write dweight and dbias
  (``3 C s``), read the statistics;
- forward+backward: the sum; ``y.copy_(x)``, the measured memory roof: ``2 numel s``.

The per-plane and per-channel terms are tiny next to the tensor terms but are counted so that
planes of 16 or 49 elements are judged fairly. FLOPs per element, in the fp32 math every
implementation does: forward 8 (sum, centred square and sum, normalize, affine), backward 12
(recompute x_hat, dy * w, two plane sums, dx, dweight and dbias partial sums).
"""

from __future__ import annotations

import math

DTYPES = ["float32", "bfloat16", "float16"]
DIRECTIONS = ["forward", "backward", "forward+backward"]
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
EPS = 1e-5  # of every instance norm the benchmarks run (torch's default)
# What triton_instnorm's forward stores per plane (kernels/constants.py; a test ties the two).
STATS_PER_PLANE = 4
STATS_ITEMSIZE = 4
FLOPS_PER_ELEMENT = {"forward": 8, "backward": 12, "forward+backward": 20}

# Peak fp32 non-tensor-core TFLOP/s, matched by substring of the device name, most specific
# first: instance norm computes in fp32 whatever the storage dtype.
PEAK_FP32_TFLOPS = [("H100 PCIe", 51.2), ("H100 NVL", 60.0), ("H100", 66.9), ("H200", 66.9),
                    ("GH200", 66.9), ("A100", 19.5), ("L40S", 91.6), ("A10G", 31.2),
                    ("RTX 4090", 82.6)]


def shape_to_str(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def shape_from_str(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def plane_elements(shape) -> int:
    """Elements per (n, c) plane: the reduction length."""
    return math.prod(shape[2:])


def norm_bytes(shape, dtype: str, direction: str) -> int:
    """Minimum DRAM traffic of one call, in bytes (see the module docstring)."""
    if direction == "forward+backward":
        return norm_bytes(shape, dtype, "forward") + norm_bytes(shape, dtype, "backward")
    size = ITEMSIZE[dtype]
    n, c = shape[0], shape[1]
    tensor = math.prod(shape) * size
    stats = STATS_PER_PLANE * n * c * STATS_ITEMSIZE
    if direction == "forward":
        return 2 * tensor + 2 * c * size + stats
    if direction == "backward":
        return 3 * tensor + 3 * c * size + stats
    raise ValueError(f"unknown direction {direction!r}")


def copy_bytes(shape, dtype: str) -> int:
    return 2 * math.prod(shape) * ITEMSIZE[dtype]


def flops(shape, direction: str) -> int:
    return FLOPS_PER_ELEMENT[direction] * math.prod(shape)


def gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


def known_peak_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_FP32_TFLOPS if key in device_name), None)
