"""Training-step benchmark of real instance-norm networks: ``python -m perf.models [options]``.

Times a full training step (zero_grad, forward with the loss, backward, Adam step) of each
network in ``NETWORKS`` (built in perf/networks.py) in four variants: PyTorch's layers
(``pytorch``) and the same model after ``perf.networks.to_triton`` (``triton_instnorm``), each
eager and under ``torch.compile`` of the whole task. Both variants start from the same weights
and batch. Before anything is timed, one float32 step of each variant is compared
(perf/training.py): the triton_instnorm variant must give PyTorch's loss and gradients, and in
every mode it must launch its kernels. A failed check is written in the ``check`` column and
makes the command exit 1; the times are still written.

* CUDA GPU: writes ``perf/results/models/<device>.csv`` (rows of the networks run replace their
  old rows) and ``.md``, draws ``plots/<device>_models.png``.
* No GPU and no ``--smoke``: says in one line that it needs a GPU and redraws the plot from the
  newest committed CSV under ``perf/results/models/`` if there is one.
* ``--smoke``: tiny versions of every network (few channels, small images) into ``--out``
  (default: a new temp dir); without a GPU through Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` before triton is imported -- so this module imports neither triton nor
  triton_instnorm at top level. torch.compile is skipped there unless ``--modes`` asks for it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # also allow `python perf/models.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf import model, summary  # noqa: E402  (torch/triton-free)
from perf.report import (PLOTS_DIR, RESULTS_DIR, _csv_list, _show, finish, output_dirs,  # noqa: E402
                         start_device, stored_rows)

MODELS_DIR = os.path.join(RESULTS_DIR, "models")
COLUMNS = ["device", "torch", "triton", "date", "network", "batch", "input_shape", "dtype",
           "memory_format", "variant", "mode", "ms_per_step", "speedup_vs_pytorch", "peak_mem_mb",
           "loss", "loss_rel_err", "grad_rel_err", "instnorm_launches", "check"]
KEY_COLUMNS = ("network", "variant", "mode")
VARIANTS = ["pytorch", "triton_instnorm"]
MODES = ["eager", "compile"]


@dataclass(frozen=True)
class Network:
    name: str
    task: str                 # builder in perf.networks
    kwargs: dict              # its arguments at full size ...
    smoke_kwargs: dict        # ... and in the smoke run
    batch: int
    smoke_batch: int
    image: tuple              # (C, *spatial) of one input sample
    smoke_image: tuple
    inputs: str = "image_pair"   # image_pair: (image, target) / (content, style); segmentation
    dtype: str = "float32"       # or "bfloat16 autocast"
    memory_format: str = "contiguous"


_UNET = dict(task="unet3d_task", kwargs=dict(features=(32, 64, 128, 256, 320, 320)),
             smoke_kwargs=dict(features=(4, 8, 16, 16)), batch=2, smoke_batch=2,
             image=(1, 128, 128, 128), smoke_image=(1, 16, 16, 16), inputs="segmentation",
             dtype="bfloat16 autocast")
_CYCLEGAN = dict(task="cyclegan_task", kwargs=dict(width=64), smoke_kwargs=dict(width=4),
                 image=(3, 256, 256), smoke_image=(3, 16, 16))
# Smoke sizes: a few channels, and images that keep every instance-norm plane above one element
# (16 -> 4x4 after two stride-2 convs; AdaIN's 32 -> 4x4 after three poolings; U-Net 16 -> 2^3).
NETWORKS = {n.name: n for n in (
    Network("style_transfer", "style_transfer_task", dict(width=32), dict(width=4), 4, 2,
            (3, 256, 256), (3, 16, 16)),
    Network("cyclegan_b1", batch=1, smoke_batch=1, **_CYCLEGAN),
    Network("cyclegan_b4", batch=4, smoke_batch=2, **_CYCLEGAN),
    Network("unet3d", **_UNET),
    Network("unet3d_channels_last", memory_format="channels_last_3d", **_UNET),
    Network("adain", "AdaINStyleTransfer", dict(width=64), dict(width=4), 8, 2, (3, 256, 256), (3, 32, 32)),
)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", type=_csv_list(list(NETWORKS)), default=list(NETWORKS),
                   help=f"comma-separated (default all: {','.join(NETWORKS)})")
    p.add_argument("--modes", type=_csv_list(MODES), default=None,
                   help="eager,compile (default both; smoke on CPU: eager, as inductor's CPU "
                        "compiles of whole networks take minutes)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps of each variant before its timed ones (default 3; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny networks; on CPU through the Triton interpreter")
    p.add_argument("--out", help="directory for the CSV and markdown (default perf/results/models/, "
                                 "smoke: a new temp dir)")
    p.add_argument("--plots", help="directory for the PNG (default plots/, smoke: <out>/plots)")
    p.add_argument("--fresh", action="store_true", help="overwrite the device CSV instead of "
                                                         "replacing only the networks run")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the loop

@dataclass
class RunConfig:
    device: object
    smoke: bool
    warmup: int
    steps: int
    env: dict


def _sizes(net: Network, smoke: bool):
    """(builder kwargs, input shape) at full or smoke size."""
    if smoke:
        return net.smoke_kwargs, (net.smoke_batch, *net.smoke_image)
    return net.kwargs, (net.batch, *net.image)


def _build(net: Network, variant: str, cfg: RunConfig):
    from perf import training

    kwargs, shape = _sizes(net, cfg.smoke)
    task = training.make_task(net.task, kwargs, variant, cfg.device, net.memory_format)
    return task, training.make_batch(shape, net.inputs, cfg.device, net.memory_format)


def check_network(net: Network, cfg: RunConfig) -> dict:
    """Before any timing: the float32 check step of both variants (perf/training.py)."""
    from perf import bench, training

    steps = {}
    for variant in VARIANTS:
        task, batch = _build(net, variant, cfg)
        steps[variant] = training.check_step(task, batch, cfg.device)
        del task, batch
        training.free(cfg.device)
    checked = training.compare(steps["pytorch"], steps["triton_instnorm"])
    bench.log(f"{net.name}: check {checked['check']} (loss {checked['loss_rel_err']}, "
              f"gradients {checked['grad_rel_err']} relative error)")
    return checked


def run_variant(net: Network, variant: str, mode: str, cfg: RunConfig):
    """(first step's loss, its kernel launches, median ms per step, peak MiB); frees after, so
    each variant's peak memory is its own."""
    from perf import bench, training

    task, batch = _build(net, variant, cfg)
    trainer = training.Trainer(task, mode, net.dtype != "float32", cfg.device)
    loss, launches = trainer.counted_step(batch)  # the first warm-up step (compiles)
    ms, peak = training.time_steps(trainer, batch, cfg.device, cfg.warmup - 1, cfg.steps)
    bench.log(f"{net.name} {variant} {mode}: {ms:.4g} ms/step, peak {peak:.0f} MiB, "
              f"{launches} triton_instnorm launches in the first step")
    del trainer, task, batch
    training.free(cfg.device)
    return loss, launches, ms, peak


def run_network(net: Network, modes: list[str], cfg: RunConfig) -> list[dict]:
    """The check, then per mode the pytorch and the triton_instnorm variant: CSV rows."""
    checked = check_network(net, cfg)
    shape = _sizes(net, cfg.smoke)[1]
    rows = []
    for mode in modes:
        common = {**cfg.env, "network": net.name, "batch": str(shape[0]),
                  "input_shape": model.shape_to_str(shape), "dtype": net.dtype,
                  "memory_format": net.memory_format, "mode": mode}
        results = {v: run_variant(net, v, mode, cfg) for v in VARIANTS}
        ref_ms = results["pytorch"][2]
        for variant, (loss, launches, ms, peak) in results.items():
            ours = variant == "triton_instnorm"
            check = _with_launches(checked, launches) if ours else \
                {"loss_rel_err": "", "grad_rel_err": "", "check": "reference"}
            rows.append({**common, "variant": variant, "ms_per_step": f"{ms:.6g}",
                         "speedup_vs_pytorch": f"{ref_ms / ms:.4g}" if ours else "",
                         "peak_mem_mb": "" if math.isnan(peak) else f"{peak:.1f}",
                         "loss": f"{loss:.8g}", "instnorm_launches": str(launches), **check})
    return rows


def _with_launches(checked: dict, launches: int) -> dict:
    """The network's check columns, failed too when this mode launched no triton_instnorm kernel
    (the converted model must reach the kernels in every mode)."""
    if launches:
        return checked
    problems = ["no triton_instnorm kernel launched"]
    if checked["check"] != "ok":
        problems.append(checked["check"].removeprefix("FAIL: "))
    return {**checked, "check": "FAIL: " + "; ".join(problems)}


def _sort_key(row):
    names = list(NETWORKS)
    return (names.index(row["network"]) if row["network"] in names else len(names), row["network"],
            MODES.index(row["mode"]) if row["mode"] in MODES else 9,
            VARIANTS.index(row["variant"]) if row["variant"] in VARIANTS else 9)


# --------------------------------------------------------------------------- summary

def _pairs(rows):
    """{(network, mode): {variant: row}} in CSV order."""
    out = {}
    for r in sorted(rows, key=_sort_key):
        out.setdefault((r["network"], r["mode"]), {})[r["variant"]] = r
    return out


def markdown(rows: list[dict], title: str, notes: list[str]) -> str:
    header = ["network", "batch x input", "dtype", "layout", "mode", "PyTorch ms/step",
              "triton_instnorm ms/step", "speedup", "PyTorch peak MiB", "triton_instnorm peak MiB",
              "check (loss / grad rel. err.)"]
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for (network, mode), by_variant in _pairs(rows).items():
        ref, ours = by_variant.get("pytorch", {}), by_variant.get("triton_instnorm", {})
        any_row = ref or ours
        speedup = ours.get("speedup_vs_pytorch")
        check = f"{ours['check']} ({ours['loss_rel_err']} / {ours['grad_rel_err']})" if ours else "–"
        lines.append("| " + " | ".join([
            network, any_row["input_shape"], any_row["dtype"], any_row["memory_format"], mode,
            ref.get("ms_per_step", "–"), ours.get("ms_per_step", "–"),
            f"{float(speedup):.2f}x" if speedup else "–",
            ref.get("peak_mem_mb") or "–", ours.get("peak_mem_mb") or "–", check]) + " |")
    lines += ["", "speedup = PyTorch ms / triton_instnorm ms per training step (same mode); > 1 means "
              "faster. peak MiB: torch.cuda.max_memory_allocated over the timed steps. check: the "
              "first step's loss and gradients of the triton_instnorm variant against PyTorch's."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def redraw(args) -> int:
    """No GPU and no --smoke: one line, then the plot from the newest stored CSV."""
    results_dir = args.out or MODELS_DIR
    stored = stored_rows(results_dir, COLUMNS)
    if stored is None:
        print(f"perf.models needs a CUDA GPU (or --smoke); no CSV under {_show(results_dir)}/ to redraw from.")
        return 0
    from perf import plots
    path, rows, device = stored
    png = plots.draw_models(rows, args.plots or PLOTS_DIR, device, model.slugify(device))
    print(f"perf.models needs a CUDA GPU (or --smoke): redrew {_show(png)} from {_show(path)} "
          f"({len(rows)} rows, measured on {device}).")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # does not import triton

    if not torch.cuda.is_available() and not args.smoke:
        return redraw(args)
    device, device_name, interpret = start_device("python -m perf.models --smoke")
    from perf import bench, plots  # imports torch, triton, triton_instnorm

    modes = args.modes or (["eager"] if interpret else list(MODES))
    notes = [f"torch {torch.__version__}, triton {bench.triton.__version__}",
             "step: zero_grad, forward with the loss, backward, Adam step; torch.compile wraps the "
             "whole task (model and loss)"]
    if interpret and "compile" not in modes:
        skipped = ("torch.compile skipped in smoke mode on CPU (inductor compiles of whole networks "
                   "take minutes there); add it with --modes eager,compile")
        print(skipped)
        notes.append(skipped)
    if interpret:
        notes.append("SMOKE RUN on CPU through the Triton interpreter: the times mean nothing")
    default_warmup, default_steps = (1, 1) if args.smoke else (3, 10)
    cfg = RunConfig(device, args.smoke, max(1, args.warmup or default_warmup),
                    args.steps or default_steps, bench.environment(device_name))
    out_dir, plots_dir = output_dirs(args, MODELS_DIR, "instnorm-models-smoke-")
    print(f"Training steps on {device_name}: {','.join(args.networks)}; modes {','.join(modes)}; "
          f"{cfg.warmup} warm-up + {cfg.steps} timed steps{' (smoke)' if args.smoke else ''}",
          file=sys.stderr)

    new_rows, failures = [], []
    for name in args.networks:
        try:
            new_rows += run_network(NETWORKS[name], modes, cfg)
        except Exception as exc:  # out of memory, a compile error: the other networks still run
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            bench.log(f"{name}: FAILED ({type(exc).__name__}: {exc})")
    failures += [f"{r['network']} {r['mode']}: {r['check']}" for r in new_rows if r["check"].startswith("FAIL")]
    slug = model.slugify(device_name)
    csv_path, md_path = os.path.join(out_dir, f"{slug}.csv"), os.path.join(out_dir, f"{slug}.md")
    rows = summary.write_csv(csv_path, new_rows, merge=not (args.fresh or args.smoke), columns=COLUMNS,
                             key_columns=KEY_COLUMNS, sort_key=_sort_key)
    if failures:
        notes.append(f"{len(failures)} failure(s): " + "; ".join(failures[:5]))
    text = markdown(rows, f"Training steps of instance-norm networks on {device_name}", notes)
    with open(md_path, "w") as f:
        f.write(text)
    png = plots.draw_models(rows, plots_dir, device_name, slug)
    return finish(text, [csv_path, md_path, png], f"{len(failures)} failure(s)" if failures else "")


if __name__ == "__main__":
    sys.exit(main())
