"""The traffic and occupancy table of the perf shape classes, computed on the CPU.

``python -m perf.traffic`` runs every shape class of ``perf/shapes.py`` at full size through
Triton's interpreter (``perf.traffic.count``), forward and backward, in bfloat16 and float32, and
writes ``perf/results/traffic.md``: per launch its grid, the programs per SM of the emulated GPU,
how many times x (and dy) were read, and the bytes moved over the minimum of ``perf/model.py``
(forward: read x, write y; backward: read x and dy, write dx; plus the O(N*C) statistics and
parameters). The launch configuration is the one that GPU gets: without a CUDA device the host
plans for an emulated one (``triton_instnorm/device.py``: an H100 unless
``TRITON_INSTNORM_EMULATE`` names another), so the same paths are taken as on it.
``--clusters`` plans with cluster launches on (``TRITON_INSTNORM_CLUSTERS=1``) and writes
``perf/results/traffic_clusters.md``; a cluster launch's programs count its CTAs per SM.

Full-size shapes are too slow to run whole through the interpreter (~0.4 M elements/s), so by
default each launch runs a sample of its programs (``programs="sample"``: first, second and last
per grid axis, exact when interior programs move the same bytes, as in every launch of these
kernels); the grid is always the real launch's. ``--programs all`` counts every program.

Providers: any provider of ``perf.bench.norm_fn`` whose kernels are Triton kernels can be counted
(the hooks are generic); the default is every such provider (eager PyTorch and torch.compile
launch no Triton kernel on the CPU). A provider that cannot run here is reported, not fatal.
The report (``perf/report.py``) appends the committed table through ``section()``.

Imports no torch or triton at module level (``perf.report`` imports it before deciding whether
``TRITON_INTERPRET`` must be set).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

from perf import model, shapes, summary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_PATH = os.path.join(REPO_ROOT, "perf", "results", "traffic.md")
CLUSTER_TABLE_PATH = os.path.join(REPO_ROOT, "perf", "results", "traffic_clusters.md")
DTYPES = ["bfloat16", "float32"]
DIRECTIONS = ["forward", "backward"]
PER_SHAPE = "## Per shape"
NOT_TRITON = {"torch_eager", "torch_compile"}  # launch no Triton kernel on the CPU
DEFAULT_PROVIDERS = [p for p in model.NORM_PROVIDERS if p not in NOT_TRITON]


def describe_launches(counted) -> str:
    """``_fwd_split_stats 64x6, _fwd_combine 1, _fwd 64x6``; ``_fwd 128 (8-CTA clusters)``."""
    return ", ".join(f"{launch.kernel} {launch.grid_text()}"
                     + (f" ({launch.ctas}-CTA clusters)" if launch.ctas > 1 else "")
                     for launch in counted.launches)


def emulated_gpu():
    """The GPU the host plans for without a CUDA device (imports triton: call after
    TRITON_INTERPRET is set)."""
    from triton_instnorm import device

    return device.emulated()


def measure(shape_class, shape, dtype: str, provider: str, programs: str) -> list[dict]:
    """Rows (one per direction) of one (shape, dtype, provider)."""
    import torch

    from perf import bench, traffic

    case = bench.make_case(shape, dtype, shape_class.memory_format, torch.device("cpu"))
    fn, inputs = bench.norm_fn(provider, case, use_module=False)
    with traffic.count(programs) as fwd:
        y = fn(*inputs)
    with traffic.count(programs) as bwd:
        torch.autograd.grad(y, inputs, case.dy)
    rows = []
    for direction, counted, read in (("forward", fwd, (case.x,)), ("backward", bwd, (case.x, case.dy))):
        minimum = model.norm_bytes(shape, dtype, direction)
        top = max((launch.programs * launch.ctas for launch in counted.launches), default=0)
        rows.append({
            "shape_class": shape_class.name, "shape": model.shape_to_str(shape), "dtype": dtype,
            "direction": direction, "provider": provider,
            "launches": describe_launches(counted), "programs": top,
            "reads": [counted.loaded(t) / (t.numel() * t.element_size()) for t in read],
            "bytes": counted.moved(), "minimum": minimum,
            "ratio": counted.moved() / minimum if counted.launches else None,
            "programs_run": sum(launch.programs_run for launch in counted.launches),
        })
    return rows


def _ratio_cell(row) -> str:
    if row is None:
        return "–"
    return "no Triton launch" if row["ratio"] is None else f"{row['ratio']:.2f}"


def _table(header, lines):
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(cells) + " |" for cells in lines] + [""]


def _by_class(rows, providers) -> list[str]:
    """One line per (class, dtype, direction), as in the bandwidth summary."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["shape_class"], r["dtype"], r["direction"])][r["provider"]].append(r)
    lines = []
    for (cls, dtype, direction), by_provider in groups.items():
        ours = by_provider.get(providers[0], [])
        sms = emulated_gpu().sms
        cells = [cls, dtype, direction, str(len(ours)),
                 f"{min(r['programs'] for r in ours) / sms:.2f}" if ours else "–"]
        for p in providers:
            ratios = [r["ratio"] for r in by_provider.get(p, []) if r["ratio"] is not None]
            cells.append(f"{summary.geomean(ratios):.2f}" if ratios else "–")
        lines.append(cells)
    header = ["class", "dtype", "direction", "shapes", "programs / SM (fewest)"]
    return _table(header + [f"{p} bytes / min (geomean)" for p in providers], lines)


def markdown(rows: list[dict], providers: list[str], notes: list[str]) -> str:
    """A line per (class, dtype, direction), then a table per class: a line per shape."""
    ours = providers[0]
    by_key = {(r["shape_class"], r["shape"], r["dtype"], r["direction"], r["provider"]): r
              for r in rows}
    gpu = emulated_gpu()
    lines = [f"# Memory traffic and programs per launch (CPU count, {gpu.name} launch "
             "configuration)", ""]
    lines += [f"- {n}" for n in notes] + [""]
    lines += _by_class(rows, providers)
    lines += [f"programs / SM: programs of the largest launch / {gpu.sms} (the fewest over the "
              "class's shapes). bytes / min: bytes loaded and stored by all launches of a call / "
              "the minimum of perf/model.py (`norm_bytes`), geometric mean over the shapes.", "",
              PER_SHAPE, "", "reads of x (dy): bytes loaded from x (dy) / its size (1.00: every "
              "element once; the forward also loads one pivot element per plane).", ""]
    header = ["shape", "dtype", "direction", f"{ours} launches (grid)", "programs / SM",
              "reads of x (dy)"] + [f"{p} bytes / min" for p in providers]
    for cls in shapes.SHAPE_CLASSES.values():
        keys = [k for k in by_key if k[0] == cls.name and k[4] == ours]
        if not keys:
            continue
        table = []
        for key in keys:
            row = by_key[key]
            reads = f"{row['reads'][0]:.2f}" + "".join(f" ({r:.2f})" for r in row["reads"][1:])
            table.append([row["shape"], row["dtype"], row["direction"], row["launches"] or "–",
                          f"{row['programs'] / gpu.sms:.2f}", reads]
                         + [_ratio_cell(by_key.get(key[:4] + (p,))) for p in providers])
        lines += [f"### {cls.name} ({cls.memory_format})", ""] + _table(header, table)
    return "\n".join(lines) + "\n"


def section(path: str = TABLE_PATH) -> str:
    """For the perf report's summary: the committed table's lines per class (headings demoted
    one level), pointing to the file for the per-shape tables."""
    if not os.path.exists(path):
        return "\n## Memory traffic\n\nNo traffic table yet: run `python -m perf.traffic`.\n"
    with open(path) as f:
        text = f.read().split(PER_SHAPE)[0].rstrip()
    text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
    shown = os.path.relpath(path, REPO_ROOT)
    shown = path if shown.startswith("..") else shown
    return f"\n{text}\n\nPer shape and launch: `{shown}`.\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", help="comma-separated shape classes (default: all)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated (default %(default)s)")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                   help="comma-separated providers of perf.bench (default %(default)s)")
    p.add_argument("--programs", choices=("sample", "all"), default="sample",
                   help="programs run per launch (default %(default)s; the grid is always real)")
    p.add_argument("--smoke", action="store_true", help="the classes' tiny smoke shapes instead")
    p.add_argument("--clusters", action="store_true",
                   help="plan with cluster launches on (TRITON_INSTNORM_CLUSTERS=1)")
    p.add_argument("--out", help=f"markdown file (default {TABLE_PATH}, with --clusters "
                   f"{CLUSTER_TABLE_PATH})")
    args = p.parse_args(argv)
    args.out = args.out or (CLUSTER_TABLE_PATH if args.clusters else TABLE_PATH)
    args.classes = shapes.select_classes(args.classes.split(",") if args.classes else None)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.providers = [p for p in args.providers.split(",") if p]
    return args


def _clusters_note(gpu) -> str:
    from triton_instnorm import device

    if device.cluster_launch(gpu, real=False):
        return "cluster launches on (TRITON_INSTNORM_CLUSTERS=1)"
    return (f"cluster launches asked for, but not taken on this GPU with Triton "
            f"{device.triton.__version__}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.clusters:
        os.environ["TRITON_INSTNORM_CLUSTERS"] = "1"
    import torch
    import triton

    rows, failures = [], []
    start = time.monotonic()
    for cls in args.classes:
        for shape in cls.smoke_shapes if args.smoke else cls.shapes:
            for dtype in args.dtypes:
                for provider in args.providers:
                    label = f"{cls.name} {model.shape_to_str(shape)} {dtype} {provider}"
                    try:
                        rows += measure(cls, shape, dtype, provider, args.programs)
                    except Exception as exc:  # a provider that is not installed or cannot run
                        failures.append(f"{label}: {type(exc).__name__}: {exc}")
                        continue
                    print(f"{time.monotonic() - start:7.1f}s {label}", file=sys.stderr, flush=True)
    gpu = emulated_gpu()
    notes = [f"torch {torch.__version__}, triton {triton.__version__}, Triton interpreter on the CPU; "
             f"launch configuration of a {gpu.sms}-SM {gpu.name}"
             + (f", {_clusters_note(gpu)}" if args.clusters else ""),
             f"programs run per launch: {args.programs}"
             + (" (first, second and last per grid axis; the grid is the real one)"
                if args.programs == "sample" else "")]
    if args.smoke:
        notes.append("smoke shapes: tiny, not the perf classes' sizes")
    notes += [f"not counted: {f}" for f in failures]
    text = markdown(rows, args.providers, notes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}")
    return 0
