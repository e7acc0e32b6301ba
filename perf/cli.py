"""What the perf commands share: paths, the interpreter switch, the device, CSV files, progress.

Imports neither torch nor triton: Triton reads ``TRITON_INTERPRET`` when it is first imported, so a
command decides (``start_device``) before anything imports triton or triton_instnorm.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "perf", "results")
PLOTS_DIR = os.path.join(REPO_ROOT, "plots")


def interpreting() -> bool:
    """Triton runs (or, imported now, would run) kernels through its interpreter: TRITON_INTERPRET
    as Triton reads it (``triton.knobs.runtime.interpret``: 1, true, yes, on or y, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def start_device(command: str):
    """(device, its name, whether the kernels run through Triton's interpreter).

    Without a GPU, sets TRITON_INTERPRET=1: call this before anything imports triton or
    triton_instnorm. ``command`` is what to run instead when that is too late."""
    import torch  # does not import triton

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_name(), False
    if "triton" in sys.modules and not interpreting():
        raise SystemExit("without a GPU the kernels run through Triton's interpreter, which "
                         f"must be on before triton is imported; run a fresh process: {command}")
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu"), "CPU (Triton interpreter)", True


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
    p.add_argument("--out", help=f"directory for the CSV and markdown (default {show(default_dir)}/"
                                 ", smoke: a new temp dir)")
    p.add_argument("--plots", help="directory for the PNGs (default plots/, smoke: <out>/plots)")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite the device CSV instead of replacing only the rows measured")


def output_dirs(args, default_dir: str, smoke_prefix: str):
    """(directory for CSV and markdown, directory for plots): a new temp dir in smoke runs, so a
    smoke run never writes into perf/results/ or plots/."""
    if args.smoke:
        out_dir = args.out or tempfile.mkdtemp(prefix=smoke_prefix)
        return out_dir, args.plots or os.path.join(out_dir, "plots")
    return args.out or default_dir, args.plots or PLOTS_DIR


def show(path: str) -> str:
    """Path relative to the working directory when inside it, else absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def slugify(name: str) -> str:
    """File-name slug of a device name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    out = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name.strip())
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_") or "unknown_device"


def rank(order, value):
    """Sort key: position in ``order``, values not in it last."""
    return order.index(value) if value in order else len(order)


# --------------------------------------------------------------------------- CSV files

def read_csv(path: str, columns: list[str]) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != columns:
            raise ValueError(f"{path}: columns {reader.fieldnames} != {columns}")
        return list(reader)


def write_csv(path: str, rows: list[dict], columns: list[str], key_columns, sort_key,
              merge: bool) -> list[dict]:
    """Write rows sorted; with ``merge`` keep the file's rows whose key was not measured again,
    so a partial run updates its rows and keeps the rest (every row has its own versions and
    date). Returns all rows written."""
    if merge and os.path.exists(path):
        fresh = {tuple(r[k] for k in key_columns) for r in rows}
        rows = [r for r in read_csv(path, columns)
                if tuple(r[k] for k in key_columns) not in fresh] + rows
    rows = sorted(rows, key=sort_key)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _commit_time(path: str) -> int | None:
    """Unix time of the last commit touching ``path``; None if untracked or no git."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", os.path.basename(path)],
                             cwd=os.path.dirname(path), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return int(text) if out.returncode == 0 and text.isdigit() else None


def redraw(results_dir: str, columns: list[str], draw) -> int:
    """Without a GPU and without --smoke: one line, and ``draw(rows, device)`` on the newest
    committed CSV under ``results_dir`` (the newest file on disk if none is committed)."""
    paths = glob.glob(os.path.join(results_dir, "*.csv"))
    committed = [(t, p) for p in paths if (t := _commit_time(p)) is not None]
    path = max(committed)[1] if committed else max(paths, key=os.path.getmtime, default=None)
    if path is None:
        print(f"No CUDA GPU found and no CSV under {show(results_dir)}/ yet: "
              "nothing to measure or plot.")
        return 0
    rows = read_csv(path, columns)
    device = rows[0]["device"] if rows else os.path.basename(path)[:-4]
    drawn = draw(rows, device)
    print(f"No CUDA GPU found: redrew {len(drawn)} plot(s) in {show(os.path.dirname(drawn[0]))}/ "
          f"from {show(path)} ({len(rows)} rows, measured on {device}).")
    return 0


# --------------------------------------------------------------------------- progress and results

def environment(device_name: str) -> dict:
    """The columns every CSV row starts with: device, versions, date."""
    import torch
    import triton
    return {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


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
