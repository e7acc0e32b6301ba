"""Bandwidth benchmark and roofline plots for triton_instnorm: run `python -m perf.report`."""
