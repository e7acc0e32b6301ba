"""What the commands share on top of the library: options, output directories, progress lines,
redrawing without a GPU, and how a command ends. Imported by the commands only."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from perf import files


def csv_list(choices=None):
    """argparse type: a comma-separated list, each item one of ``choices`` (any if None)."""
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items
    return parse


def add_output_args(p: argparse.ArgumentParser, default_dir: str):
    """--smoke, --out, --plots, --fresh: the options of the commands that write a device CSV."""
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes; without a GPU through Triton's interpreter")
    p.add_argument("--out", help=f"directory for the CSV and markdown (default "
                                 f"{files.show(default_dir)}/, smoke: a new temp dir)")
    p.add_argument("--plots", help="directory for the PNGs (default plots/, smoke: <out>/plots)")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite the device CSV instead of replacing only the rows measured")


def output_dirs(args, default_dir: str, smoke_prefix: str):
    """(directory for CSV and markdown, directory for plots): a new temp dir in smoke runs, so a
    smoke run never writes into perf/results/ or plots/."""
    if args.smoke:
        out_dir = args.out or tempfile.mkdtemp(prefix=smoke_prefix)
        return out_dir, args.plots or os.path.join(out_dir, "plots")
    return args.out or default_dir, args.plots or files.PLOTS_DIR


def redraw(results_dir: str, columns: list[str], draw) -> int:
    """Without a GPU and without --smoke: one line, and ``draw(rows, device)`` on the newest
    committed CSV under ``results_dir`` (the newest file on disk if none is committed)."""
    path = files.newest_csv(results_dir)
    if path is None:
        print(f"No CUDA GPU found and no CSV under {files.show(results_dir)}/ yet: "
              "nothing to measure or plot.")
        return 0
    rows = files.read_csv(path, columns)
    device = rows[0]["device"] if rows else os.path.basename(path)[:-4]
    drawn = draw(rows, device)
    print(f"No CUDA GPU found: redrew {len(drawn)} plot(s) in "
          f"{files.show(os.path.dirname(drawn[0]))}/ from {files.show(path)} ({len(rows)} rows, "
          f"measured on {device}).")
    return 0


_START = time.monotonic()


def log(msg: str):
    """A progress line on stderr, with the time since the command started."""
    elapsed = int(time.monotonic() - _START)
    print(f"{elapsed // 60:3d}m{elapsed % 60:02d}s {msg}", file=sys.stderr, flush=True)


def draw(plot: str, *args) -> tuple[list[str], list[str]]:
    """(files, problems) of ``perf.plots.<plot>(*args)``. Without matplotlib nothing is drawn and
    that is the problem reported; the CSV holds everything to redraw them elsewhere."""
    try:
        from perf import plots
    except ImportError as exc:
        return [], [f"plots not drawn: {exc}"]
    return getattr(plots, plot)(*args), []


def finish(text: str, written: list[str], failures: list[str]) -> int:
    """Print the summary and what was written; the exit code (1 when something failed)."""
    print(text)
    for path in written:
        print(f"wrote {path}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0
