"""Running the perf commands in a subprocess, as the perf pipeline tests do.

Triton reads TRITON_INTERPRET when it is first imported, which an in-process call cannot control
once other tests imported triton_instnorm: so each command is a fresh process. It inherits the
environment: the interpreter on the CPU (conftest sets it), compiled kernels on a GPU.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

from perf import files

REPO_ROOT = Path(files.REPO_ROOT)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_perf(module, *args, timeout=600):
    """``python -m perf.<module> args`` from the repository root, headless."""
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", f"perf.{module}", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_csv(out_dir: Path):
    """(column names, rows) of the one CSV in ``out_dir``."""
    (path,) = out_dir.glob("*.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_pngs(plots_dir: Path, names):
    for name in names:
        (png,) = plots_dir.glob(f"*_{name}")
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC


def repo_outputs():
    """Files under the repository's own output folders, to prove a smoke run leaves them alone."""
    found = {}
    for folder in map(Path, (files.RESULTS_DIR, files.PLOTS_DIR)):
        if folder.is_dir():
            for f in folder.rglob("*"):
                found[f] = f.stat().st_mtime_ns
    return found
