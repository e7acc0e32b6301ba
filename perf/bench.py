"""Measuring: providers, timing and the measurement loop.

Importing this module imports torch and triton; ``perf.report`` imports it only
after deciding whether ``TRITON_INTERPRET`` must be set.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.testing

import triton_instnorm
from perf import model, peers
from perf.shapes import ShapeClass

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TORCH_MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
EPS = 1e-5


# --------------------------------------------------------------------------- timing

def _do_bench_median(fn) -> float:
    """Median ms of ``fn`` via triton.testing.do_bench (flushes L2 between runs).

    ``return_mode`` exists in every Triton 3.x we target (3.6 on the GPU
    machines, 3.9 here), but fall back to ``quantiles`` in case a build lacks it.
    """
    params = inspect.signature(triton.testing.do_bench).parameters
    if "return_mode" in params:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    result = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)


def _cpu_median(fn, reps: int) -> float:
    """CPU fallback (smoke only): do_bench needs a GPU event timer."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_ms(fn, device: torch.device, cpu_reps: int = 3) -> float:
    # Explicit warm-up outside the timed region: the first call JIT-compiles
    # Triton kernels / runs autotuning / traces torch.compile, which would
    # otherwise poison do_bench's run-time estimate.
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return _do_bench_median(fn)
    return _cpu_median(fn, cpu_reps)


# --------------------------------------------------------------------------- providers

@dataclass
class Case:
    """Inputs of one (shape, dtype), shared by all providers and directions."""
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    dy: torch.Tensor


def make_case(shape, dtype: str, memory_format: str, device: torch.device) -> Case:
    # Allocation and random data happen here, outside every timed region;
    # generated on the device because nnunet_3d tensors are 134M elements.
    torch.manual_seed(0)
    opts = dict(device=device, dtype=TORCH_DTYPES[dtype])
    fmt = TORCH_MEMORY_FORMATS[memory_format]
    x = torch.randn(shape, **opts).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, **opts).contiguous(memory_format=fmt)
    c = shape[1]
    weight = (1 + 0.1 * torch.randn(c, **opts)).requires_grad_(True)
    bias = (0.1 * torch.randn(c, **opts)).requires_grad_(True)
    return Case(x, weight, bias, dy)


def _eager(x, weight, bias):
    return F.instance_norm(x, weight=weight, bias=bias, use_input_stats=True, eps=EPS)


def _triton(x, weight, bias):
    return triton_instnorm.instance_norm(x, weight=weight, bias=bias, use_input_stats=True, eps=EPS)


_MODULES = {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}


def _triton_module(case: Case):
    """The nn.Module path (``--module``): the module owns weight and bias."""
    cls = getattr(triton_instnorm, _MODULES[case.x.dim()])
    module = cls(case.x.shape[1], eps=EPS, affine=True, track_running_stats=False)
    module = module.to(device=case.x.device, dtype=case.x.dtype)
    with torch.no_grad():
        module.weight.copy_(case.weight)
        module.bias.copy_(case.bias)
    return (lambda x, weight, bias: module(x)), (case.x, module.weight, module.bias)


def _compiled():
    # A fresh dynamo state per (shape, dtype): compiling dozens of static shapes
    # of one function would otherwise hit the recompile limit and silently fall
    # back to eager.  dynamic=False gives inductor static shapes, its best case.
    torch._dynamo.reset()
    # "backward" replays one graph with retain_graph=True, which AOTAutograd
    # refuses when the backward was compiled with donated buffers (a memory,
    # not a speed, optimization), so turn them off.
    functorch_config = getattr(getattr(torch, "_functorch", None), "config", None)
    if functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(_eager, dynamic=False)


def norm_fn(provider: str, case: Case, use_module: bool):
    """(callable(x, w, b) -> y, the tensors gradients are taken with respect to)."""
    if provider == "triton_instnorm":
        # Never time the package's documented eager fallback by accident
        # (e.g. CPU tensors without TRITON_INTERPRET=1).
        available = getattr(triton_instnorm, "kernels_available", None)
        if available is not None and not available(case.x):
            raise RuntimeError(f"triton_instnorm kernels unavailable for {case.x.device} tensors")
        if use_module:
            return _triton_module(case)
        return _triton, (case.x, case.weight, case.bias)
    if provider == "torch_eager":
        return _eager, (case.x, case.weight, case.bias)
    if provider == "torch_compile":
        return _compiled(), (case.x, case.weight, case.bias)
    if provider in peers.PEERS:
        # Checked once against eager PyTorch; raises peers.Unavailable where it cannot run.
        return peers.build(provider, case, EPS)
    raise ValueError(f"unknown provider {provider!r}")


def direction_fn(fn, inputs, dy, direction: str):
    """The callable to time for one direction.

    forward runs with autograd enabled, as in training: it is the same call
    that forward+backward makes (saving mean/rstd for backward), and
    torch.compile needs one forward graph for all three directions instead of
    an extra no_grad one.  backward times only ``torch.autograd.grad`` on a
    graph built once outside the timed region (retain_graph so it can be
    replayed); autograd.grad returns the gradients instead of accumulating
    into ``.grad``, so no zeroing is timed.
    """
    if direction == "forward":
        return lambda: fn(*inputs)
    if direction == "backward":
        y = fn(*inputs)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    if direction == "forward+backward":
        return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)
    raise ValueError(f"unknown direction {direction!r}")


def copy_fn(case: Case):
    src = case.x.detach()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# --------------------------------------------------------------------------- loop

@dataclass
class RunConfig:
    classes: list[ShapeClass]
    dtypes: list[str]
    directions: list[str]
    providers: list[str]       # normalization providers; copy is always measured
    smoke: bool
    use_module: bool
    device: torch.device
    device_name: str


def environment(device_name: str) -> dict:
    """The columns every CSV row carries: device, versions, date."""
    from datetime import datetime, timezone
    return {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


_START = time.monotonic()


def log(msg: str):
    elapsed = int(time.monotonic() - _START)
    print(f"{elapsed // 60:3d}m{elapsed % 60:02d}s {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    rows: list[dict]            # CSV rows
    failures: list[str]         # descriptions of failed measurements
    # {provider: {dtype: reason}} for peers that cannot run a dtype here (not failures)
    unavailable: dict[str, dict[str, str]]


def run(cfg: RunConfig) -> Outcome:
    """Measure everything."""
    global _START
    _START = time.monotonic()
    env = environment(cfg.device_name)
    work = []
    for shape_class in cfg.classes:
        shapes = shape_class.smoke_shapes if cfg.smoke else shape_class.shapes
        for shape in shapes:
            for dtype in cfg.dtypes:
                work.append((shape_class, shape, dtype))
    per_case = 1 + len(cfg.providers) * len(cfg.directions)
    total, done = len(work) * per_case, 0
    rows, failures, unavailable = [], [], {}

    def emit(shape_class, shape, dtype, direction, provider, ms, roof_gbps):
        num_bytes = model.bytes_for(provider, shape, dtype, direction)
        rate = model.gbps(num_bytes, ms)
        rows.append({
            **env, "shape_class": shape_class.name, "shape": model.shape_to_str(shape),
            "dtype": dtype, "direction": direction, "provider": provider,
            "ms": f"{ms:.6g}", "gbps": f"{rate:.6g}",
            "pct_of_roof": f"{100.0 * rate / roof_gbps:.4g}" if roof_gbps else "",
        })
        return rate

    for shape_class, shape, dtype in work:
        label = f"{shape_class.name} {model.shape_to_str(shape)} {dtype}"
        try:
            case = make_case(shape, dtype, shape_class.memory_format, cfg.device)
        except Exception as exc:  # e.g. out of memory on a smaller GPU
            failures.append(f"{label}: allocation failed: {exc}")
            done += per_case
            log(f"[{done}/{total}] {label}: SKIPPED ({type(exc).__name__}: {exc})")
            continue
        # The roof: one copy measurement per (shape, dtype), written once per
        # requested direction so every (shape, dtype, direction) group is complete.
        copy_ms = time_ms(copy_fn(case), cfg.device)
        roof = model.gbps(model.copy_bytes(shape, dtype), copy_ms)
        for direction in cfg.directions:
            emit(shape_class, shape, dtype, direction, model.ROOF_PROVIDER, copy_ms, roof)
        done += 1
        log(f"[{done}/{total}] {label} copy: {copy_ms:.4f} ms {roof:.1f} GB/s")

        for provider in cfg.providers:
            try:
                fn, inputs = norm_fn(provider, case, cfg.use_module)
            except peers.Unavailable as exc:
                unavailable.setdefault(provider, {})[dtype] = str(exc)
                done += len(cfg.directions)
                log(f"[{done}/{total}] {label} {provider}: unavailable ({exc})")
                continue
            except Exception as exc:
                failures.append(f"{label} {provider}: setup failed: {exc}")
                done += len(cfg.directions)
                log(f"[{done}/{total}] {label} {provider}: FAILED setup ({type(exc).__name__}: {exc})")
                continue
            for direction in cfg.directions:
                done += 1
                try:
                    ms = time_ms(direction_fn(fn, inputs, case.dy, direction), cfg.device)
                except Exception as exc:
                    failures.append(f"{label} {direction} {provider}: {type(exc).__name__}: {exc}")
                    log(f"[{done}/{total}] {label} {direction} {provider}: FAILED")
                    log(traceback.format_exc(limit=3))
                    continue
                rate = emit(shape_class, shape, dtype, direction, provider, ms, roof)
                log(f"[{done}/{total}] {label} {direction} {provider}: "
                     f"{ms:.4f} ms {rate:.1f} GB/s {100 * rate / roof:.0f}% of copy")
        del case
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return Outcome(rows, failures, unavailable)
