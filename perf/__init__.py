"""The benchmarks of triton_instnorm: a small library and its commands (perf/README.md)."""
