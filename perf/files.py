"""Where the perf commands write, and their CSV files (torch-free).

Committed results go under ``perf/results/`` and ``plots/``; smoke runs write into temp
directories instead (``cli.output_dirs``, ``python -m perf.traffic --smoke``).
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "perf", "results")  # perf.report: <device>.csv and .md
TRAINING_DIR = os.path.join(RESULTS_DIR, "models")  # perf.training: <device>.csv and .md
TRAFFIC_TABLE = os.path.join(RESULTS_DIR, "traffic.md")  # perf.traffic
CLUSTER_TRAFFIC_TABLE = os.path.join(RESULTS_DIR, "traffic_clusters.md")  # perf.traffic --clusters
PLOTS_DIR = os.path.join(REPO_ROOT, "plots")


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


def newest_csv(directory: str) -> str | None:
    """The most recently committed CSV under ``directory`` (the newest file on disk if none is
    committed); None when there is none."""
    paths = glob.glob(os.path.join(directory, "*.csv"))
    committed = [(t, p) for p in paths if (t := _commit_time(p)) is not None]
    return max(committed)[1] if committed else max(paths, key=os.path.getmtime, default=None)
