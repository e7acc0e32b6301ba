"""Training steps of real instance-norm networks: ``python -m perf.training [options]``.

Times a full training step (zero_grad, forward with the loss, backward, Adam step) of each
network of perf/networks.py in four variants: PyTorch's layers (``pytorch``) and the same model
after ``networks.to_triton`` (``triton_instnorm``), each eager and under ``torch.compile`` of the
whole task, from the same weights and batch. Per variant: a first step (the compile), warm-up
steps, then timed steps (perf/timing.py); each variant is built, timed and freed before the next,
so its peak memory is its own.

The check, before anything is timed: one eager float32 step of each variant, TF32 off; the loss
must agree within a relative 1e-4 and every parameter's gradient within a relative (L2) 1e-3,
leaving out gradients under 1e-3 of the largest (a conv bias right before an instance norm has a
zero gradient in exact arithmetic, and its rounding noise differs between any two
implementations). Networks timed under bfloat16 autocast are checked in float32 too: under
autocast two correct implementations differ as much as autocast differs from float32, so a bf16
comparison could not tell a wrong kernel from rounding. In every mode the triton_instnorm variant
must also launch its kernels (``triton_instnorm.launch.LAUNCHES``). A failure goes into the
``check`` column and makes the exit code 1; the times are still written.

Outputs as perf.report's: ``perf/results/models/<device>.csv`` and ``.md``,
``plots/<device>_models.png``; without a GPU, one line and the plot redrawn from the newest
committed CSV; ``--smoke``: tiny networks into a temp dir, without a GPU through Triton's
interpreter and without torch.compile (minutes of inductor per network) unless ``--modes`` asks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import sys

import torch

from perf import cli, files, machine, model, summary
from perf.networks import NETWORKS, make_batch, make_task
from perf.schema import MODES, PYTORCH, TRAINING_COLUMNS, TRAINING_KEY, VARIANTS, rank
from perf.timing import time_steps

TOLERANCES = (1e-4, 1e-3)  # (loss, gradient) relative error between the float32 check steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", type=cli.csv_list(NETWORKS), default=list(NETWORKS),
                   help=f"comma-separated (default all: {','.join(NETWORKS)})")
    p.add_argument("--modes", type=cli.csv_list(MODES),
                   help="eager,compile (default both; smoke without a GPU: eager)")
    p.add_argument("--warmup", type=int, help="untimed steps before the timed ones, the first "
                                              "included (default 3; smoke 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 10; smoke 1)")
    cli.add_output_args(p, files.TRAINING_DIR)
    args = p.parse_args(argv)
    args.warmup = max(1, args.warmup or (1 if args.smoke else 3))
    args.steps = args.steps or (1 if args.smoke else 10)
    return args


def sort_key(row: dict):
    return (rank(list(NETWORKS), row["network"]), row["network"],
            rank(MODES, row["mode"]), rank(VARIANTS, row["variant"]))


class Trainer:
    """One variant: the task (compiled or not), Adam, and the step."""

    def __init__(self, task, mode: str, autocast: bool, device):
        if mode == "compile":
            torch._dynamo.reset()  # a fresh compile per variant: no recompile limit, no reuse
        self.run_task = torch.compile(task) if mode == "compile" else task
        self.named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam([p for _, p in self.named], lr=1e-4)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    def loss_and_grads(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.run_task(*batch)
        loss.backward()
        return loss

    def step(self, batch):
        loss = self.loss_and_grads(batch)
        self.optimizer.step()
        return loss


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def full_precision():
    """float32 convolutions and matmuls without TF32 (CUDA's convolution default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def grad_error(got: dict, want: dict) -> float:
    """Largest per-tensor ||got - want|| / ||want||, leaving out tensors whose reference gradient
    is under 1e-3 of the largest (see the module docstring)."""
    norms = {n: want[n].norm().item() for n in want}
    largest = max(norms.values(), default=0.0)
    errors = [(got[n] - want[n]).norm().item() / norms[n] for n in want
              if norms[n] > 1e-3 * largest]
    return max(errors, default=0.0)


def compare(reference, candidate) -> dict:
    """The CSV's check columns for two check steps (loss, {parameter: gradient})."""
    (ref_loss, ref_grads), (loss, grads) = reference, candidate
    loss_err = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    grad_err = grad_error(grads, ref_grads)
    problems = [f"{what} rel. error {err:.2e} > {tol:g}" for what, err, tol in
                (("loss", loss_err, TOLERANCES[0]), ("grad", grad_err, TOLERANCES[1]))
                if not err <= tol]
    return {"loss_rel_err": f"{loss_err:.3g}", "grad_rel_err": f"{grad_err:.3g}",
            "check": "FAIL: " + "; ".join(problems) if problems else "ok"}


def check_network(net, device, smoke: bool) -> dict:
    """The float32 check step of both variants, compared (see the module docstring)."""
    steps = []
    for variant in VARIANTS:
        trainer = Trainer(make_task(net, variant, device, smoke), "eager", False, device)
        with full_precision():
            loss = trainer.loss_and_grads(make_batch(net, device, smoke)).item()
        steps.append((loss, {n: (torch.zeros_like(p) if p.grad is None else p.grad).float().cpu()
                             for n, p in trainer.named}))
        del trainer
        free(device)
    checked = compare(*steps)
    cli.log(f"{net.name}: check {checked['check']} (loss {checked['loss_rel_err']}, "
            f"gradients {checked['grad_rel_err']} relative error)")
    return checked


def run_variant(net, variant: str, mode: str, args, device):
    """(first step's loss, its kernel launches, median ms per step, peak MiB)."""
    from triton_instnorm.launch import LAUNCHES  # after the command decided on the interpreter

    batch = make_batch(net, device, args.smoke)
    trainer = Trainer(make_task(net, variant, device, args.smoke), mode,
                      net.dtype != "float32", device)
    before = sum(LAUNCHES.values())
    loss = trainer.step(batch).item()  # the first warm-up step (compiles)
    launches = sum(LAUNCHES.values()) - before
    ms, peak = time_steps(functools.partial(trainer.step, batch), device, args.warmup - 1,
                          args.steps)
    cli.log(f"{net.name} {variant} {mode}: {ms:.4g} ms/step, peak {peak:.0f} MiB, "
            f"{launches} triton_instnorm launches in the first step")
    del trainer, batch
    free(device)
    return loss, launches, ms, peak


def run_network(net, modes, args, device, env) -> list[dict]:
    """The check, then per mode the pytorch and the triton_instnorm variant: CSV rows. The
    triton_instnorm rows fail their check too in a mode that launched none of its kernels."""
    checked = check_network(net, device, args.smoke)
    shape = net.sizes(args.smoke)[1]
    rows = []
    for mode in modes:
        results = {v: run_variant(net, v, mode, args, device) for v in VARIANTS}
        for variant, (loss, launches, ms, peak) in results.items():
            check = {"loss_rel_err": "", "grad_rel_err": "", "check": "reference"}
            if variant != PYTORCH:
                problems = [] if launches else ["no triton_instnorm kernel launched"]
                if checked["check"] != "ok":
                    problems.append(checked["check"].removeprefix("FAIL: "))
                check = {**checked, "check": "FAIL: " + "; ".join(problems) if problems else "ok"}
            rows.append({
                **env, "network": net.name, "batch": str(shape[0]),
                "input_shape": model.shape_to_str(shape), "dtype": net.dtype,
                "memory_format": net.memory_format, "variant": variant, "mode": mode,
                "ms_per_step": f"{ms:.6g}", "speedup_vs_pytorch":
                    "" if variant == PYTORCH else f"{results[PYTORCH][2] / ms:.4g}",
                "peak_mem_mb": "" if math.isnan(peak) else f"{peak:.1f}",
                "loss": f"{loss:.8g}", "instnorm_launches": str(launches), **check})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        def draw(rows, device):
            from perf import plots
            return plots.draw_training(rows, args.plots or files.PLOTS_DIR, device,
                                       files.slugify(device))
        return cli.redraw(args.out or files.TRAINING_DIR, TRAINING_COLUMNS, draw)
    device, device_name, interpret = machine.start_device("python -m perf.training --smoke")
    import triton

    modes = args.modes or (["eager"] if interpret else MODES)
    notes = [f"torch {torch.__version__}, triton {triton.__version__}",
             "step: zero_grad, forward with the loss, backward, Adam step; torch.compile wraps the "
             "whole task (model and loss)"]
    if interpret and "compile" not in modes:
        notes.append("torch.compile skipped in smoke mode on CPU (inductor compiles of whole "
                     "networks take minutes there); add it with --modes eager,compile")
        print(notes[-1])
    if interpret:
        notes.append("SMOKE RUN on CPU through the Triton interpreter: the times mean nothing")
    out_dir, plots_dir = cli.output_dirs(args, files.TRAINING_DIR, "instnorm-training-smoke-")
    print(f"Training steps on {device_name}: {','.join(args.networks)}; modes {','.join(modes)}; "
          f"{args.warmup} warm-up + {args.steps} timed steps{' (smoke)' if args.smoke else ''}",
          file=sys.stderr)

    env, new_rows, failures = machine.environment(device_name), [], []
    for name in args.networks:
        try:
            new_rows += run_network(NETWORKS[name], modes, args, device, env)
        except Exception as exc:  # out of memory, a compile error: the other networks still run
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            cli.log(f"{name}: FAILED ({type(exc).__name__}: {exc})")
    failures += [f"{r['network']} {r['mode']}: {r['check']}" for r in new_rows
                 if r["check"].startswith("FAIL")]
    slug = files.slugify(device_name)
    csv_path, md_path = os.path.join(out_dir, f"{slug}.csv"), os.path.join(out_dir, f"{slug}.md")
    rows = files.write_csv(csv_path, new_rows, TRAINING_COLUMNS, TRAINING_KEY, sort_key,
                           not args.fresh)
    if failures:
        notes.append(f"{len(failures)} failure(s): " + "; ".join(failures[:5]))
    text = summary.training(rows, f"Training steps of instance-norm networks on {device_name}",
                            notes)
    with open(md_path, "w") as f:
        f.write(text)
    pngs, problems = cli.draw("draw_training", rows, plots_dir, device_name, slug)
    return cli.finish(text, [csv_path, md_path, *pngs], failures + problems)


if __name__ == "__main__":
    sys.exit(main())
