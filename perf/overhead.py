"""Host cost per call: our layer's Python against PyTorch's whole ``F.instance_norm`` call.

A 2-8 MB instance norm runs in 2-5 us on a current GPU, so in eager mode a layer whose host code
takes longer than that is bound by it. This measures the host side alone: every kernel launch
is replaced by a no-op (``launch.run``, the one launch point, is swapped for a counter, and the
kernels themselves refuse to be launched while it is measured, so neither a GPU nor Triton's
interpreter runs), and our layer is timed next to PyTorch's ``F.instance_norm`` on a tiny CPU
tensor, its computation included, in the same run:

    python -m perf.overhead                  # the table and the split of our time
    python -m perf.overhead --profile        # and cProfile's top entries for the module forward

Rows (microseconds per call; ours on an (8, 128, 8, 8) float32 tensor, ``InstanceNorm2d(128,
affine=True)`` in training mode, and ``instance_norm`` with its parameters; torch's
``F.instance_norm`` and ``nn.InstanceNorm2d`` on (2, 4, 4, 4), affine):

- ``forward, no_grad``: inference;
- ``forward``: grad mode on, the affine parameters require grad (a training forward);
- ``forward+backward``: the input requires grad too; ``torch.autograd.grad`` of the input and
  the parameters for a prepared output gradient (nothing accumulates into ``.grad``).

The split times the same forward entered at successively deeper layers (module, functional,
``ops.forward``, ``launch.forward``), so each difference is what one layer adds: the module's
own code (torch's ``InstanceNorm`` forward), the argument checks, autograd and dispatch, and the
launch preparation (views, plan, output buffers).

Timing: the CPU time of this thread (``time.thread_time_ns``), which a loaded machine inflates
far less than wall time; torch on one intra-op thread, so that its tiny computation stays on
this thread too. ``repeats`` rounds, each timing every row over ``number`` calls after a
warm-up, rows interleaved within a round so that a change in load hits all of them alike, the
garbage collector paused while a row is timed; the median round is reported. The ratios to
torch's row, measured in the same rounds, are the figures to compare across runs.

Measured figures: perf/README.md; the history of this path's cost: perf/NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time

if "triton" not in sys.modules:
    # Without a GPU our layer takes the kernels only under Triton's interpreter, which triton
    # reads when it is first imported; no kernel runs here either way.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton_instnorm as tin  # noqa: E402
from triton_instnorm import launch, ops  # noqa: E402

OURS_SHAPE = (8, 128, 8, 8)
TORCH_SHAPE = (2, 4, 4, 4)


@contextlib.contextmanager
def no_launches():
    """``launch.run`` counts instead of launching; a kernel launched any other way raises.
    Yields the counter (launches per kernel name)."""
    counts = {}
    kernels = {type(k) for k in vars(launch).values() if hasattr(k, "fn") and hasattr(k, "run")}

    def counted(kernel, grid, **arguments):
        counts[kernel.fn.__name__] = counts.get(kernel.fn.__name__, 0) + 1

    def refuse(self, grid):
        raise RuntimeError(f"{self.fn.__name__} launched while launches are disabled")

    saved_run = launch.run
    saved = {cls: cls.__dict__.get("__getitem__") for cls in kernels}
    launch.run = counted
    for cls in kernels:
        cls.__getitem__ = refuse
    try:
        yield counts
    finally:
        launch.run = saved_run
        for cls, getitem in saved.items():
            if getitem is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = getitem


@contextlib.contextmanager
def one_thread():
    """torch's CPU kernels on one thread: its tiny instance norm would otherwise wake a thread
    pool, whose latency on a loaded machine swamps the host cost being measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_rows(rows: dict, number: int = 2000, repeats: int = 9, warmup: int = 200) -> dict:
    """{name: median us per call} of each zero-argument callable, rows interleaved per round."""
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    rounds = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            gc.collect()
            gc.disable()
            try:
                start = time.thread_time_ns()
                for _ in range(number):
                    fn()
                elapsed = time.thread_time_ns() - start
            finally:
                gc.enable()
            rounds[name].append(elapsed / number / 1e3)
    return {name: statistics.median(times) for name, times in rounds.items()}


class _Cases:
    """The callables timed: ours and torch's, forward (no_grad and grad) and forward+backward."""

    def __init__(self, device: str = "cpu"):
        torch.manual_seed(0)
        self.module = tin.InstanceNorm2d(OURS_SHAPE[1], affine=True, device=device)
        self.x = torch.randn(OURS_SHAPE, device=device)
        self.x_grad = self.x.clone().requires_grad_(True)
        self.dy = torch.randn(OURS_SHAPE, device=device)
        self.tx = torch.randn(TORCH_SHAPE)
        self.tx_grad = self.tx.clone().requires_grad_(True)
        self.tw = torch.ones(TORCH_SHAPE[1], requires_grad=True)
        self.tb = torch.zeros(TORCH_SHAPE[1], requires_grad=True)
        self.tdy = torch.randn(TORCH_SHAPE)
        self.torch_module = torch.nn.InstanceNorm2d(TORCH_SHAPE[1], affine=True)

    # ours
    def module_forward(self):
        return self.module(self.x)

    def functional_forward(self):
        m = self.module
        return tin.instance_norm(self.x, weight=m.weight, bias=m.bias)

    def module_forward_backward(self):
        m = self.module
        return torch.autograd.grad(m(self.x_grad), (self.x_grad, m.weight, m.bias), self.dy)

    def functional_forward_backward(self):
        m = self.module
        y = tin.instance_norm(self.x_grad, weight=m.weight, bias=m.bias)
        return torch.autograd.grad(y, (self.x_grad, m.weight, m.bias), self.dy)

    # torch
    def torch_forward(self):
        return F.instance_norm(self.tx, weight=self.tw, bias=self.tb)

    def torch_module_forward(self):
        return self.torch_module(self.tx)

    def torch_forward_backward(self):
        y = F.instance_norm(self.tx_grad, weight=self.tw, bias=self.tb)
        return torch.autograd.grad(y, (self.tx_grad, self.tw, self.tb), self.tdy)

    # the layers under the module forward, entered one by one (grad mode on)
    def layer_ops(self):
        m = self.module
        return ops.forward(self.x, m.weight, m.bias, None, None, use_input_stats=True, eps=1e-5,
                           activation=0, negative_slope=0.01, store_stats=True)

    def layer_launch(self):
        m = self.module
        return launch.forward(self.x, m.weight, m.bias, None, None, use_input_stats=True,
                              eps=1e-5, activation=0, negative_slope=0.01, store_stats=True)


def measure(number: int = 2000, repeats: int = 9, device: str = "cpu") -> dict:
    """Every row of the table and the layer split, in one run: {row: us per call}."""
    c = _Cases(device)
    with no_launches() as counts, one_thread():
        with torch.no_grad():
            inference = time_rows({"ours module": c.module_forward,
                                   "ours functional": c.functional_forward,
                                   "torch module": c.torch_module_forward,
                                   "torch F.instance_norm": c.torch_forward}, number, repeats)
        forward = time_rows({"ours module": c.module_forward,
                             "ours functional": c.functional_forward,
                             "ours ops.forward": c.layer_ops,
                             "ours launch.forward": c.layer_launch,
                             "torch module": c.torch_module_forward,
                             "torch F.instance_norm": c.torch_forward}, number, repeats)
        both = time_rows({"ours module": c.module_forward_backward,
                          "ours functional": c.functional_forward_backward,
                          "torch F.instance_norm": c.torch_forward_backward},
                         max(1, number // 4), repeats)
    assert counts.get("_fwd", 0) > 0 and counts.get("_bwd", 0) > 0, counts
    return {"forward, no_grad": inference, "forward": forward, "forward+backward": both}


def layer_costs(forward: dict) -> dict:
    """What each layer adds to the module forward (grad mode on), us per call."""
    return {
        "module (nn.Module call, torch's InstanceNorm forward)":
            forward["ours module"] - forward["ours functional"],
        "functional (argument checks, layout)":
            forward["ours functional"] - forward["ours ops.forward"],
        "operator (dispatch, autograd)":
            forward["ours ops.forward"] - forward["ours launch.forward"],
        "launch preparation (views, plan, buffers)": forward["ours launch.forward"],
    }


def profile(calls: int = 3000, top: int = 20) -> str:
    """cProfile's top entries (by own time) of the module forward in grad mode."""
    c = _Cases()
    with no_launches(), one_thread():
        for _ in range(200):
            c.module_forward()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            c.module_forward()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def report(results: dict) -> str:
    lines = [f"host cost per call, us (ours {OURS_SHAPE}, torch's F.instance_norm "
             f"{TORCH_SHAPE}; launches replaced by a no-op)", ""]
    width = max(len(name) for rows in results.values() for name in rows)
    for row, timings in results.items():
        lines.append(f"{row}:")
        torch_us = timings["torch F.instance_norm"]
        for name, us in timings.items():
            lines.append(f"  {name:<{width}} {us:8.1f}   x{us / torch_us:4.2f} torch")
    lines += ["", "split of the module forward (grad mode on):"]
    for name, us in layer_costs(results["forward"]).items():
        lines.append(f"  {name:<55} {us:6.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=9, help="rounds (the median is kept)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top entries")
    args = parser.parse_args(argv)
    if not tin.kernels_available(torch.empty(0)):
        raise SystemExit("the kernels are unavailable on the CPU: set TRITON_INTERPRET=1 before "
                         "triton is imported")
    print(report(measure(args.number, args.repeats)))
    if args.profile:
        print()
        print(profile())


if __name__ == "__main__":
    main()
