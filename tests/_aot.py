"""The tests' handle on ahead-of-time compilation: perf/aot.py (what to compile, the worker
processes) and perf/aot_worker.py (how a launch is captured, specialized and compiled)."""

from perf.aot import DEFAULT_DEVICE, bwd, fwd, run_worker, spec_name, stats_bwd, update

__all__ = ["DEFAULT_DEVICE", "bwd", "fwd", "run_worker", "spec_name", "stats_bwd", "update"]
