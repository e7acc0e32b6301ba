"""The markdown summaries of the bandwidth report, the training steps and the traffic table,
computed from their rows (no torch or triton work)."""

from __future__ import annotations

import math
import os
from collections import defaultdict

from perf import files, model
from perf.schema import BASELINES, OURS, PROVIDERS, PYTORCH, ROOF, rank
from perf.shapes import SHAPE_CLASSES, class_order

PER_SHAPE = "## Per shape"  # where the traffic table's per-class lines end


def geomean(values) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def speedups(rows: list[dict], baseline: str) -> dict:
    """{(shape_class, dtype, direction): [baseline ms / triton_instnorm ms, per shape]}"""
    table = defaultdict(dict)
    for r in rows:
        table[(r["shape_class"], r["shape"], r["dtype"], r["direction"])][r["provider"]] = r
    out = defaultdict(list)
    for (cls, _shape, dtype, direction), by_provider in table.items():
        ours, base = by_provider.get(OURS), by_provider.get(baseline)
        if ours and base:
            out[(cls, dtype, direction)].append(float(base["ms"]) / float(ours["ms"]))
    return out


def overall_speedups(rows: list[dict]) -> dict:
    """{baseline: geometric-mean speedup of triton_instnorm over every shape, dtype, direction}"""
    ratios = {b: [v for vals in speedups(rows, b).values() for v in vals] for b in BASELINES}
    return {b: geomean(r) for b, r in ratios.items() if r}


def _fmt(value: float) -> str:
    """3 significant digits below 100 (smoke runs are ~0.1 GB/s), integers above."""
    if value != value:  # NaN: nothing measured
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _table(header, lines) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(cells) + " |" for cells in lines]


def _head(title: str, notes) -> list[str]:
    return [f"# {title}", ""] + ([f"- {n}" for n in notes] + [""] if notes else [])


def bandwidth(rows: list[dict], title: str, notes=(), peers: dict[str, str] | None = None) -> str:
    """A line per (shape class, dtype, direction), geometric means over the class's shapes;
    ``peers``: {peer: "measured: ..." or "unavailable: <reason>"}, a table of its own, so that
    a peer that could not run is listed, not silently missing."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    norm = [p for p in providers if p != ROOF]
    vs = {b: speedups(rows, b) for b in BASELINES if b in providers}
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["shape_class"], r["dtype"], r["direction"])][r["provider"]].append(r)

    header = ["class", "dtype", "direction", "shapes"] + [f"{p} GB/s (% roof)" for p in norm]
    header += ["copy GB/s"] if ROOF in providers else []
    header += [f"speedup vs {b.removeprefix('torch_')}" for b in vs]
    lines = []
    for key in sorted(groups, key=lambda k: (class_order(k[0]), rank(model.DTYPES, k[1]),
                                             rank(model.DIRECTIONS, k[2]))):
        by_provider = groups[key]
        cells = [*key, str(len({r["shape"] for rs in by_provider.values() for r in rs}))]
        for p in norm:
            rs = by_provider.get(p, [])
            gb = geomean(float(r["gbps"]) for r in rs)
            pct = geomean(float(r["pct_of_roof"]) for r in rs if r["pct_of_roof"])
            cells.append(f"{_fmt(gb)} ({_fmt(pct)}%)" if rs else "–")
        if ROOF in providers:
            cells.append(_fmt(geomean(float(r["gbps"]) for r in by_provider.get(ROOF, []))))
        for b in vs:
            ratio = geomean(vs[b].get(key, []))
            cells.append("–" if ratio != ratio else f"{ratio:.2f}x")
        lines.append(cells)
    out = _head(title, notes) + _table(header, lines) + [
        "", "GB/s and % of roof: geometric mean over the class's shapes; % of roof = achieved "
        "GB/s / GB/s of `y.copy_(x)` on the same tensor. speedup = baseline ms / triton_instnorm "
        "ms (geometric mean; > 1 means faster)."]
    if peers:
        out += ["", "## Peer providers", ""] + _table(["peer", "status"], peers.items())
    return "\n".join(out) + "\n"


def training(rows: list[dict], title: str, notes) -> str:
    """A line per (network, mode), rows in CSV order: PyTorch's variant next to ours."""
    pairs = {}
    for r in rows:
        pairs.setdefault((r["network"], r["mode"]), {})[r["variant"]] = r
    header = ["network", "batch x input", "dtype", "layout", "mode", "PyTorch ms/step",
              "triton_instnorm ms/step", "speedup", "PyTorch peak MiB", "triton_instnorm peak MiB",
              "check (loss / grad rel. err.)"]
    lines = []
    for (network, mode), by_variant in pairs.items():
        ref, ours = by_variant.get(PYTORCH, {}), by_variant.get(OURS, {})
        first, speedup = ref or ours, ours.get("speedup_vs_pytorch")
        lines.append([
            network, first["input_shape"], first["dtype"], first["memory_format"], mode,
            ref.get("ms_per_step", "–"), ours.get("ms_per_step", "–"),
            f"{float(speedup):.2f}x" if speedup else "–", ref.get("peak_mem_mb") or "–",
            ours.get("peak_mem_mb") or "–",
            f"{ours['check']} ({ours['loss_rel_err']} / {ours['grad_rel_err']})" if ours else "–"])
    return "\n".join(_head(title, notes) + _table(header, lines) + [
        "", "speedup = PyTorch ms / triton_instnorm ms per training step (same mode); > 1 means "
        "faster. peak MiB: torch.cuda.max_memory_allocated over the timed steps. check: the first "
        "step's loss and gradients of the triton_instnorm variant against PyTorch's."]) + "\n"


def traffic(rows: list[dict], providers: list[str], notes, gpu_name: str, sms: int) -> str:
    """A line per (class, dtype, direction), then per class a line per shape and direction."""
    def ratio(row):
        return "–" if row is None else (
            "no Triton launch" if row["ratio"] is None else f"{row['ratio']:.2f}")

    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["shape_class"], r["dtype"], r["direction"])][r["provider"]].append(r)
    lines = []
    for key, by_provider in groups.items():
        ours = by_provider.get(providers[0], [])
        fewest = f"{min(r['programs'] for r in ours) / sms:.2f}" if ours else "–"
        cells = [*key, str(len(ours)), fewest]
        for p in providers:
            ratios = [r["ratio"] for r in by_provider.get(p, []) if r["ratio"] is not None]
            cells.append(f"{geomean(ratios):.2f}" if ratios else "–")
        lines.append(cells)
    out = _head(f"Memory traffic and programs per launch (CPU count, {gpu_name} launch "
                "configuration)", notes)
    out += _table(["class", "dtype", "direction", "shapes", "programs / SM (fewest)"]
                  + [f"{p} bytes / min (geomean)" for p in providers], lines) + [""]
    out += [f"programs / SM: programs of the largest launch / {sms} (the fewest over the class's "
            "shapes). bytes / min: bytes loaded and stored by all launches of a call / the "
            "minimum of perf/model.py (`norm_bytes`), geometric mean over the shapes.", "",
            PER_SHAPE, "", "reads of x (dy): bytes loaded from x (dy) / its size (1.00: every "
            "element once; the forward also loads one pivot element per plane).", ""]
    header = ["shape", "dtype", "direction", f"{providers[0]} launches (grid)", "programs / SM",
              "reads of x (dy)"] + [f"{p} bytes / min" for p in providers]
    by_key = {(r["shape_class"], r["shape"], r["dtype"], r["direction"], r["provider"]): r
              for r in rows}
    for cls in SHAPE_CLASSES.values():
        keys = [k for k in by_key if k[0] == cls.name and k[4] == providers[0]]
        if not keys:
            continue
        table = []
        for key in keys:
            row = by_key[key]
            reads = f"{row['reads'][0]:.2f}" + "".join(f" ({r:.2f})" for r in row["reads"][1:])
            table.append([row["shape"], row["dtype"], row["direction"], row["launches"] or "–",
                          f"{row['programs'] / sms:.2f}", reads]
                         + [ratio(by_key.get(key[:4] + (p,))) for p in providers])
        out += [f"### {cls.name} ({cls.memory_format})", ""] + _table(header, table) + [""]
    return "\n".join(out) + "\n"


def traffic_section(path: str) -> str:
    """For the bandwidth summary: the traffic table's lines per class (headings one level
    down), pointing to the file for the per-shape tables."""
    if not os.path.exists(path):
        return "\n## Memory traffic\n\nNo traffic table yet: run `python -m perf.traffic`.\n"
    with open(path) as f:
        text = f.read().split(PER_SHAPE)[0].rstrip()
    text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
    shown = os.path.relpath(path, files.REPO_ROOT)
    return f"\n{text}\n\nPer shape and launch: `{path if shown.startswith('..') else shown}`.\n"
