"""The performance report: ``python -m perf.report [options]`` from the repository root.

* CUDA GPU present: measure every provider / direction / dtype / shape class,
  write ``perf/results/<device>.csv`` and ``.md``, draw ``plots/<device>_*.png``.
* No GPU: say so in one line and redraw the plots from the newest committed
  CSV under ``perf/results/`` (or say there is none and exit 0).
* ``--smoke``: the whole pipeline on tiny shapes.  Without a GPU it runs on the
  CPU through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the
  environment *before* triton (or triton_instnorm) is imported -- so this
  module imports neither at top level.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # also allow `python perf/report.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf import model, shapes, summary, traffic_report  # noqa: E402  (torch/triton-free)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "perf", "results")
PLOTS_DIR = os.path.join(REPO_ROOT, "plots")


def _show(path: str) -> str:
    """Path relative to the working directory when inside it, else absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def _csv_list(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {choices}")
        return items
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=_csv_list(None),
                   help=f"comma-separated shape classes (default all: {','.join(shapes.SHAPE_CLASSES)})")
    p.add_argument("--dtypes", type=_csv_list(model.DTYPES), default=list(model.DTYPES),
                   help=f"comma-separated (default {','.join(model.DTYPES)})")
    p.add_argument("--directions", type=_csv_list(model.DIRECTIONS), default=list(model.DIRECTIONS),
                   help=f"comma-separated (default {','.join(model.DIRECTIONS)})")
    p.add_argument("--providers", type=_csv_list(model.PROVIDERS), default=None,
                   help="normalization providers (default: all; smoke on CPU: all but torch_compile, "
                        "whose CPU compiles take minutes). copy, the roof, is always measured. "
                        f"Peers ({','.join(model.PEER_PROVIDERS)}) that cannot run here are "
                        "reported as unavailable with the reason.")
    p.add_argument("--module", action="store_true",
                   help="time triton_instnorm through its InstanceNorm{1,2,3}d modules "
                        "instead of the functional instance_norm")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes; on CPU through the Triton interpreter")
    p.add_argument("--out", help="directory for the CSV and markdown summary "
                                 "(default perf/results/, smoke: a new temp dir)")
    p.add_argument("--plots", help="directory for the PNGs (default plots/, smoke: <out>/plots)")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite the device CSV instead of replacing only re-measured rows")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="fp32 compute roof for the roofline plot (default: known-device table)")
    args = p.parse_args(argv)
    if args.classes:
        shapes.select_classes(args.classes)  # fail early on a typo
    return args


def _commit_time(path: str) -> int | None:
    """Unix time of the last commit touching ``path``; None if untracked or no git."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", os.path.basename(path)],
                             cwd=os.path.dirname(path), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return int(text) if out.returncode == 0 and text.isdigit() else None


def newest_csv(results_dir: str) -> str | None:
    """The most recently committed CSV; if none is committed, the newest file on disk."""
    paths = glob.glob(os.path.join(results_dir, "*.csv"))
    committed = [(t, p) for p in paths if (t := _commit_time(p)) is not None]
    if committed:
        return max(committed)[1]
    return max(paths, key=os.path.getmtime, default=None)


def stored_rows(results_dir: str, columns: list[str] = model.CSV_COLUMNS):
    """(path, rows, device) of the newest stored CSV under ``results_dir``; None if there is none."""
    path = newest_csv(results_dir)
    if path is None:
        return None
    rows = summary.read_csv(path, columns)
    return path, rows, rows[0]["device"] if rows else os.path.basename(path)[:-4]


def redraw(args) -> int:
    """No GPU and no --smoke: one line of output, then plots from the stored CSV."""
    results_dir = args.out or RESULTS_DIR
    stored = stored_rows(results_dir)
    if stored is None:
        print(f"No CUDA GPU found and no CSV under {_show(results_dir)}/ yet: nothing to measure or plot.")
        return 0
    from perf import plots
    path, rows, device = stored
    plots_dir = args.plots or PLOTS_DIR
    print(f"No CUDA GPU found: redrawing {_show(plots_dir)}/ from {_show(path)} "
          f"({len(rows)} rows, measured on {device}).")
    plots.draw_all(rows, plots_dir, device, model.slugify(device),
                   args.peak_tflops or model.known_peak_tflops(device))
    return 0


def peer_statuses(requested: list[str], reasons: dict, outcome) -> dict[str, str]:
    """{peer: "unavailable: <reason>" or "measured: ..."} for the summary's peer table."""
    out = {}
    for name in requested:
        if reasons[name] is not None:
            out[name] = f"unavailable: {reasons[name]}"
            continue
        rows = [r for r in outcome.rows if r["provider"] == name]
        dtypes = sorted({r["dtype"] for r in rows}, key=model.DTYPES.index)
        parts = [f"measured: {len(rows)} rows ({', '.join(dtypes) or 'none'})"]
        by_reason = {}
        for dtype, reason in outcome.unavailable.get(name, {}).items():
            by_reason.setdefault(reason, []).append(dtype)
        parts += [f"unavailable for {', '.join(d)}: {reason}" for reason, d in by_reason.items()]
        failed = [f for f in outcome.failures if f" {name}:" in f]
        parts += [f"{len(failed)} failed: {failed[0]}"] if failed else []
        out[name] = "; ".join(parts)
    return out


def start_device(command: str):
    """(device, its name, whether the kernels run through Triton's interpreter).

    Without a GPU, sets TRITON_INTERPRET=1, which triton reads when it is first imported: call
    this before anything imports triton or triton_instnorm. ``command`` is what to run instead
    when that is too late."""
    import torch  # does not import triton

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_name(), False
    if "triton_instnorm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke without a GPU needs TRITON_INTERPRET=1 before triton_instnorm "
                         f"is imported; run it as a fresh process: {command}")
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu"), "CPU (Triton interpreter)", True


def output_dirs(args, default_dir: str, smoke_prefix: str):
    """(directory for CSV and markdown, directory for plots): a new temp dir in smoke runs."""
    if args.smoke:
        out_dir = args.out or tempfile.mkdtemp(prefix=smoke_prefix)
        return out_dir, args.plots or os.path.join(out_dir, "plots")
    return args.out or default_dir, args.plots or PLOTS_DIR


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # does not import triton

    if not torch.cuda.is_available() and not args.smoke:
        return redraw(args)
    device, device_name, interpret = start_device("python -m perf.report --smoke")
    from perf import bench, peers, plots  # imports torch, triton, triton_instnorm

    providers = args.providers
    if providers is None:
        providers = list(model.NORM_PROVIDERS) + list(model.PEER_PROVIDERS)
        if interpret:
            providers.remove("torch_compile")
    providers = [p for p in providers if p != model.ROOF_PROVIDER]
    requested_peers = [p for p in providers if p in model.PEER_PROVIDERS]
    peer_reasons = {name: peers.unavailable_reason(name, interpret) for name in requested_peers}
    providers = [p for p in providers if peer_reasons.get(p) is None]

    out_dir, plots_dir = output_dirs(args, RESULTS_DIR, "instnorm-perf-smoke-")
    slug = model.slugify(device_name)
    csv_path = os.path.join(out_dir, f"{slug}.csv")
    md_path = os.path.join(out_dir, f"{slug}.md")

    cfg = bench.RunConfig(
        classes=shapes.select_classes(args.classes), dtypes=args.dtypes,
        directions=args.directions, providers=providers, smoke=args.smoke,
        use_module=args.module, device=device, device_name=device_name)
    print(f"Measuring on {device_name}: {len(cfg.classes)} shape classes, dtypes {','.join(cfg.dtypes)}, "
          f"providers {','.join(providers + [model.ROOF_PROVIDER])}"
          f"{' (smoke, Triton interpreter)' if interpret else ' (smoke)' if args.smoke else ''}",
          file=sys.stderr)
    if requested_peers:
        print(peers.status_line(peer_reasons), file=sys.stderr)
    outcome = bench.run(cfg)
    new_rows, failures = outcome.rows, outcome.failures
    rows = summary.write_csv(csv_path, new_rows, merge=not (args.fresh or args.smoke))

    notes = [f"torch {torch.__version__}, triton {bench.triton.__version__}",
             f"triton_instnorm timed through the "
             f"{'InstanceNorm modules (--module)' if args.module else 'functional instance_norm'}"]
    if interpret:
        notes.append("SMOKE RUN on CPU through the Triton interpreter: the numbers mean nothing")
    overall = summary.overall_speedups(new_rows)
    notes += [f"overall geometric-mean speedup vs {b}: {v:.2f}x" for b, v in overall.items()]
    if failures:
        notes.append(f"{len(failures)} measurement(s) failed: " + "; ".join(failures[:5]))
    text = summary.markdown(rows, f"Instance norm bandwidth on {device_name}", notes,
                            peers=peer_statuses(requested_peers, peer_reasons, outcome))
    text += traffic_report.section()  # bytes moved / minimum and programs, counted on the CPU
    with open(md_path, "w") as f:
        f.write(text)
    peak = args.peak_tflops or model.known_peak_tflops(device_name)
    pngs = plots.draw_all(rows, plots_dir, device_name, slug, peak)

    written = [f"{csv_path} ({len(new_rows)} new rows, {len(rows)} total)", md_path, *pngs]
    return finish(text, written, f"{len(failures)} measurement(s) failed" if failures else "")


def finish(text: str, written: list[str], failed: str) -> int:
    """Print the summary and what was written; the exit code (1 when something failed)."""
    print(text)
    for path in written:
        print(f"wrote {path}")
    if failed:
        print(f"{failed}; see stderr", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
