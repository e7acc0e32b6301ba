"""The traffic table: ``python -m perf.traffic [options]`` from the repository root.

Counts (perf/counting.py, through Triton's interpreter on the CPU) every shape class of
perf/shapes.py, forward and backward, in bfloat16 and float32, with the launch configuration the
host plans without a CUDA device (for an emulated GPU, an H100 unless ``TRITON_INSTNORM_EMULATE``
names another), and writes ``perf/results/traffic.md``: per launch its grid, programs per SM (a
cluster launch's CTAs), how many times x (and dy) were read, and bytes moved over the minimum of
perf/model.py. ``--clusters`` counts triton_instnorm_clusters instead (cluster launches on) into
``perf/results/traffic_clusters.md``; ``--providers`` counts any provider of perf/providers.py
whose kernels are Triton kernels. ``--smoke`` counts the classes' tiny shapes into a new temp dir
(or ``--out``), never over the committed tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from perf import cli, files, model, shapes, summary
from perf.counting import PROGRAM_MODES, count
from perf.schema import CLUSTERS, OURS

DEFAULT_DTYPES = ["bfloat16", "float32"]
DEFAULT_PROVIDERS = [OURS]  # eager PyTorch and torch.compile launch no Triton kernel


def emulated_gpu() -> tuple[str, int]:
    """(name, SMs) of the GPU the host plans launches for without a CUDA device."""
    from triton_instnorm.device import emulated

    gpu = emulated()
    return gpu.name, gpu.sms


def measure(shape_class, shape, dtype: str, provider: str, programs: str) -> list[dict]:
    """Rows (forward, backward) of one (shape, dtype, provider)."""
    import torch

    from perf import providers

    case = providers.make_case(shape, dtype, shape_class.memory_format, torch.device("cpu"))
    fn, inputs = providers.norm_fn(provider, case)
    with count(programs) as fwd:
        y = fn(*inputs)
    with count(programs) as bwd:
        torch.autograd.grad(y, inputs, case.dy)
    rows = []
    for direction, counted, read in (("forward", fwd, (case.x,)),
                                     ("backward", bwd, (case.x, case.dy))):
        minimum = model.norm_bytes(shape, dtype, direction)
        rows.append({
            "shape_class": shape_class.name, "shape": model.shape_to_str(shape), "dtype": dtype,
            "direction": direction, "provider": provider,
            "launches": ", ".join(f"{lc.kernel} {lc.grid_text()}"
                                  + (f" ({lc.ctas}-CTA clusters)" if lc.ctas > 1 else "")
                                  for lc in counted.launches),
            "programs": max((lc.programs * lc.ctas for lc in counted.launches), default=0),
            "reads": [counted.loaded(t) / (t.numel() * t.element_size()) for t in read],
            "ratio": counted.moved() / minimum if counted.launches else None})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=cli.csv_list(shapes.SHAPE_CLASSES),
                   help="comma-separated shape classes (default: all)")
    p.add_argument("--dtypes", type=cli.csv_list(model.DTYPES), default=DEFAULT_DTYPES,
                   help=f"comma-separated (default {','.join(DEFAULT_DTYPES)})")
    p.add_argument("--providers", type=cli.csv_list(), default=DEFAULT_PROVIDERS,
                   help="comma-separated providers of perf/providers.py (default %(default)s)")
    p.add_argument("--programs", choices=[m for m in PROGRAM_MODES if m != "none"],
                   default="sample",
                   help="programs run per launch (default %(default)s; the grid is always real)")
    p.add_argument("--smoke", action="store_true", help="the classes' tiny smoke shapes instead")
    p.add_argument("--clusters", action="store_true",
                   help="count triton_instnorm_clusters (TRITON_INSTNORM_CLUSTERS=1) instead")
    p.add_argument("--out", help=f"markdown file (default {files.show(files.TRAFFIC_TABLE)}, with "
                                 f"--clusters {files.show(files.CLUSTER_TRAFFIC_TABLE)}; smoke: "
                                 "in a new temp dir)")
    return p.parse_args(argv)


def out_path(args) -> str:
    """The table's path: ``--out``, a new temp dir in smoke runs (never a committed table), else
    the committed table of what is counted."""
    name = files.CLUSTER_TRAFFIC_TABLE if args.clusters else files.TRAFFIC_TABLE
    if args.out:
        return args.out
    if args.smoke:
        return os.path.join(tempfile.mkdtemp(prefix="instnorm-traffic-smoke-"),
                            os.path.basename(name))
    return name


def main(argv=None) -> int:
    args = parse_args(argv)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # counted through the interpreter, GPU or not
    import torch
    import triton

    from perf import providers

    gpu_name, sms = emulated_gpu()
    config = f"launch configuration of a {sms}-SM {gpu_name}"
    if args.clusters:
        why = providers.clusters_reason(torch.empty(0))
        if why:
            raise SystemExit(f"perf.traffic --clusters: {why}")
        args.providers = [CLUSTERS if p == OURS else p for p in args.providers]
        config += ", cluster launches on (TRITON_INSTNORM_CLUSTERS=1)"
    path = out_path(args)
    rows, failures, start = [], [], time.monotonic()
    for cls in shapes.select_classes(args.classes):
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
    notes = [f"torch {torch.__version__}, triton {triton.__version__}, Triton interpreter on the "
             f"CPU; {config}",
             f"programs run per launch: {args.programs}" + (
                 " (first, second and last per grid axis; the grid is the real one)"
                 if args.programs == "sample" else "")]
    notes += ["smoke shapes: tiny, not the perf classes' sizes"] if args.smoke else []
    notes += [f"not counted: {f}" for f in failures]
    text = summary.traffic(rows, args.providers, notes, gpu_name, sms)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return cli.finish(text, [path], [])  # what was not counted is in the table's notes


if __name__ == "__main__":
    sys.exit(main())
