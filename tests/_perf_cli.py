"""Running the perf commands in a subprocess, as the perf smoke tests do.

TRITON_INTERPRET must be set before triton is first imported, which an in-process call cannot
guarantee once other tests imported triton_instnorm: so each command is a fresh process.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_perf(module, *args, timeout=600):
    """``python -m perf.<module> args`` from the repository root, headless, with the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", f"perf.{module}", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def repo_outputs():
    """Files under the repository's own output folders, to prove a smoke run leaves them alone."""
    found = {}
    for folder in (REPO_ROOT / "perf" / "results", REPO_ROOT / "plots"):
        if folder.is_dir():
            for f in folder.rglob("*"):
                found[f] = f.stat().st_mtime_ns
    return found
