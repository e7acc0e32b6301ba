"""Timers: one call (``time_ms``, the bandwidth report) and a training step (``time_steps``).

On a GPU, ``time_ms`` is ``triton.testing.do_bench(fn, warmup=25, rep=100)``'s median, which
flushes L2 between runs, after an explicit first call outside the timed region (JIT compiles,
torch.compile traces and autotuning would otherwise distort do_bench's run-time estimate);
``quick`` (smoke runs, which test the pipeline, not the numbers) takes 1 and 5 ms instead.
``time_steps`` times each step between two CUDA events with a synchronize, after the warm-up
steps, and reports the median and ``torch.cuda.max_memory_allocated`` over the timed steps. On the
CPU (smoke runs only, the numbers mean nothing) both take ``time.perf_counter`` medians.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch


def _do_bench_median(fn, warmup: int, rep: int) -> float:
    import triton.testing

    if "return_mode" in inspect.signature(triton.testing.do_bench).parameters:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    result = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)


def _cpu_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_ms(fn, device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of ``fn()``, after one untimed call."""
    fn()
    if device.type != "cuda":
        return statistics.median(_cpu_ms(fn) for _ in range(3))
    torch.cuda.synchronize()
    return _do_bench_median(fn, *((1, 5) if quick else (25, 100)))


def time_steps(step, device: torch.device, warmup: int, steps: int):
    """(median ms of ``step()``, peak MiB allocated over the timed steps; NaN on the CPU)."""
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        return statistics.median(_cpu_ms(step) for _ in range(steps)), float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20
