"""CSV reading/writing and the markdown summary table (torch-free)."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

from perf import model
from perf.shapes import class_order

# A measurement is identified by these columns; re-measuring replaces the old row.
KEY_COLUMNS = ("shape_class", "shape", "dtype", "direction", "provider")


def read_csv(path: str, columns: list[str] = model.CSV_COLUMNS) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != columns:
            raise ValueError(f"{path}: columns {reader.fieldnames} != {columns}")
        return list(reader)


def _sort_key(row: dict):
    return (class_order(row["shape_class"]), model.numel(model.shape_from_str(row["shape"])), row["shape"],
            model.DTYPES.index(row["dtype"]) if row["dtype"] in model.DTYPES else 99,
            model.DIRECTIONS.index(row["direction"]) if row["direction"] in model.DIRECTIONS else 99,
            model.PROVIDERS.index(row["provider"]) if row["provider"] in model.PROVIDERS else 99)


def write_csv(path: str, rows: list[dict], merge: bool, columns: list[str] = model.CSV_COLUMNS,
              key_columns=KEY_COLUMNS, sort_key=_sort_key) -> list[dict]:
    """Write rows; with ``merge`` keep earlier rows of this file that were not re-measured.

    Merging lets a partial re-run (``--classes gan_2d``) update its rows without
    dropping the rest of the device's table; every row keeps its own
    torch/triton/date columns, so mixed runs stay traceable. ``columns``, ``key_columns``
    and ``sort_key`` default to the bandwidth CSV's (perf.models passes its own).
    """
    if merge and os.path.exists(path):
        fresh = {tuple(r[k] for k in key_columns) for r in rows}
        old = [r for r in read_csv(path, columns) if tuple(r[k] for k in key_columns) not in fresh]
        rows = old + rows
    rows = sorted(rows, key=sort_key)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def geomean(values) -> float:
    values = [v for v in values if v > 0]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def index_rows(rows: list[dict]):
    """{(shape_class, shape, dtype, direction): {provider: row}}"""
    table = defaultdict(dict)
    for r in rows:
        table[(r["shape_class"], r["shape"], r["dtype"], r["direction"])][r["provider"]] = r
    return table


def speedups(rows: list[dict], baseline: str) -> dict:
    """{(shape_class, dtype, direction): [t_baseline / t_triton per shape]}"""
    out = defaultdict(list)
    for (cls, _shape, dtype, direction), by_provider in index_rows(rows).items():
        ours, base = by_provider.get("triton_instnorm"), by_provider.get(baseline)
        if ours and base:
            out[(cls, dtype, direction)].append(float(base["ms"]) / float(ours["ms"]))
    return out


def _fmt(value: float) -> str:
    """3 significant digits below 100 (smoke runs are ~0.1 GB/s), integers above."""
    if value != value:  # NaN: nothing measured
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def markdown(rows: list[dict], title: str, notes: list[str] = (), peers: dict[str, str] | None = None) -> str:
    """One line per (shape class, dtype, direction): geometric means over the class's shapes.

    ``peers``: {peer provider: what happened to it} ("measured: ..." or "unavailable: <reason>"),
    written as its own table so that a peer that could not run is listed, not silently missing.
    """
    providers = [p for p in model.PROVIDERS if any(r["provider"] == p for r in rows)]
    norm = [p for p in providers if p != model.ROOF_PROVIDER]
    vs = {b: speedups(rows, b) for b in model.BASELINES if b in providers}
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["shape_class"], r["dtype"], r["direction"])][r["provider"]].append(r)

    header = ["class", "dtype", "direction", "shapes"]
    header += [f"{p} GB/s (% roof)" for p in norm]
    header += ["copy GB/s"] if model.ROOF_PROVIDER in providers else []
    header += [f"speedup vs {b.removeprefix('torch_')}" for b in vs]
    lines = [f"# {title}", ""]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]

    def order(key):
        cls, dtype, direction = key
        return (class_order(cls), model.DTYPES.index(dtype) if dtype in model.DTYPES else 99,
                model.DIRECTIONS.index(direction) if direction in model.DIRECTIONS else 99)

    for key in sorted(groups, key=order):
        by_provider = groups[key]
        shapes = {r["shape"] for rs in by_provider.values() for r in rs}
        cells = [*key, str(len(shapes))]
        for p in norm:
            rs = by_provider.get(p, [])
            gb = geomean(float(r["gbps"]) for r in rs)
            pct = geomean(float(r["pct_of_roof"]) for r in rs if r["pct_of_roof"])
            cells.append(f"{_fmt(gb)} ({_fmt(pct)}%)" if rs else "–")
        if model.ROOF_PROVIDER in providers:
            cells.append(_fmt(geomean(float(r["gbps"]) for r in by_provider.get(model.ROOF_PROVIDER, []))))
        for b in vs:
            ratio = geomean(vs[b].get(key, []))
            cells.append("–" if ratio != ratio else f"{ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "GB/s and % of roof: geometric mean over the class's shapes; "
              "% of roof = achieved GB/s / GB/s of `y.copy_(x)` on the same tensor. "
              "speedup = baseline ms / triton_instnorm ms (geometric mean; > 1 means faster)."]
    if peers:
        lines += ["", "## Peer providers", "", "| peer | status |", "|---|---|"]
        lines += [f"| {name} | {text} |" for name, text in peers.items()]
    return "\n".join(lines) + "\n"


def overall_speedups(rows: list[dict]) -> dict:
    """{baseline: geometric-mean speedup of triton_instnorm over all shapes/dtypes/directions}"""
    out = {}
    for baseline in model.BASELINES:
        ratios = [v for vals in speedups(rows, baseline).values() for v in vals]
        if ratios:
            out[baseline] = geomean(ratios)
    return out
