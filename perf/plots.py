"""The plots, drawn from CSV rows with matplotlib (Agg: GPU machines and CI have no display).

Bandwidth report: achieved GB/s vs plane size, one panel per (dtype, direction), sweeps as curves,
other classes as points, copy in grey with a dotted line at the dtype's best copy GB/s; a roofline
with the best copy GB/s in the CSV as memory roof and the device's fp32 peak as compute roof; the
speedup of triton_instnorm over each baseline, geometric means over each class's shapes and
dtypes. Training steps: ms per step, speedup and peak memory per network."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from perf import model  # noqa: E402
from perf.schema import (BASELINES, CLUSTERS, COMPILE, EAGER, FLAG_GEMS, LIGER, MODES,  # noqa: E402
                         OURS, PROVIDERS, PYTORCH, ROOF, VARIANTS)
from perf.shapes import SHAPE_CLASSES, class_order  # noqa: E402
from perf.summary import geomean, speedups  # noqa: E402

COLORS = {OURS: "tab:blue", CLUSTERS: "tab:cyan", EAGER: "tab:orange", COMPILE: "tab:green",
          FLAG_GEMS: "tab:red", LIGER: "tab:purple", ROOF: "0.45"}
DTYPE_MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^"}
PLOT_FILES = ("bandwidth_vs_plane.png", "roofline.png", "speedup.png")


def _present(rows, column, order):
    seen = {r[column] for r in rows}
    return [v for v in order if v in seen] + sorted(seen - set(order))


def _is_sweep(row) -> bool:
    known = SHAPE_CLASSES.get(row["shape_class"])
    return bool(known and known.is_sweep)


def _plane(row) -> int:
    return model.plane_elements(model.shape_from_str(row["shape"]))


def _grid(nrows, ncols, width=5.0, height=3.8):
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def _save(fig, title, path):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grouped_bars(ax, groups, series: dict, value, ylabel, title,
                  missing="not measured (no GPU)", fmt="{:.3g}"):
    """One bar per group and series, annotated. ``series``: {key: (label, color)};
    ``value(group, key)``: a float or None."""
    width = 0.8 / max(1, len(series))
    measured = False
    for k, (key, (label, color)) in enumerate(series.items()):
        values = [value(g, key) for g in groups]
        measured = measured or any(values)
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=label, color=color)
        for bar, v in zip(bars, values):
            if v:
                ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if measured:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, missing, transform=ax.transAxes, ha="center")


def plot_bandwidth_vs_plane(rows, path, title):
    """Achieved GB/s vs elements per plane; rows = dtypes, columns = directions.

    plane_sweep classes (fixed total size) are drawn as curves, the other
    shape classes as scattered points; the measured copy roof is the grey
    curve/crosses plus a dashed line at the best copy bandwidth of the dtype.
    """
    dtypes = _present(rows, "dtype", model.DTYPES)
    directions = _present(rows, "direction", model.DIRECTIONS)
    providers = _present(rows, "provider", PROVIDERS)
    fig, axes = _grid(len(dtypes), len(directions))
    for i, dtype in enumerate(dtypes):
        for j, direction in enumerate(directions):
            ax = axes[i][j]
            panel = [r for r in rows if r["dtype"] == dtype and r["direction"] == direction]
            for provider in providers:
                pts = [r for r in panel if r["provider"] == provider]
                sweep = sorted((_plane(r), float(r["gbps"])) for r in pts if _is_sweep(r))
                other = [(_plane(r), float(r["gbps"])) for r in pts if not _is_sweep(r)]
                is_roof = provider == ROOF
                label = "copy (roof)" if is_roof else provider
                style = dict(color=COLORS.get(provider), label=label)
                if sweep:
                    ax.plot(*zip(*sweep), "--" if is_roof else "-",
                            marker=None if is_roof else ".", **style)
                    style.pop("label")
                if other:
                    ax.scatter(*zip(*other), marker="x" if is_roof else "o", s=22, alpha=0.8,
                               **style)
                if is_roof and pts:
                    best = max(float(r["gbps"]) for r in pts)
                    ax.axhline(best, color=COLORS[ROOF], ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{direction}, {dtype}", fontsize=10)
            ax.set_xlabel("elements per (n, c) plane")
            ax.set_ylabel("achieved GB/s")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    _save(fig, f"{title}: bandwidth vs plane size (dotted: best copy GB/s)", path)


def plot_roofline(rows, path, title, peak_tflops):
    """Classic roofline: FLOP/byte vs GFLOP/s, one panel per direction.

    Memory roof: the best measured copy bandwidth in the CSV.  Compute roof:
    ``peak_tflops`` (fp32, non-tensor-core) when known, otherwise omitted.
    """
    directions = _present(rows, "direction", model.DIRECTIONS)
    norm = [p for p in _present(rows, "provider", PROVIDERS) if p != ROOF]
    copy_rates = [float(r["gbps"]) for r in rows if r["provider"] == ROOF]
    roof_gbps = max(copy_rates) if copy_rates else None
    fig, axes = _grid(1, len(directions))
    for j, direction in enumerate(directions):
        ax = axes[0][j]
        intensities = []
        for provider in norm:
            for dtype in _present(rows, "dtype", model.DTYPES):
                pts = [r for r in rows if r["provider"] == provider and r["direction"] == direction
                       and r["dtype"] == dtype]
                if not pts:
                    continue
                xs, ys = [], []
                for r in pts:
                    shape = model.shape_from_str(r["shape"])
                    ai = model.flops(shape, direction) / model.norm_bytes(shape, dtype, direction)
                    xs.append(ai)
                    ys.append(float(r["gbps"]) * ai)  # GB/s * FLOP/byte = GFLOP/s
                intensities += xs
                ax.scatter(xs, ys, color=COLORS.get(provider), marker=DTYPE_MARKERS.get(dtype, "o"),
                           s=20, alpha=0.75, label=f"{provider} {dtype}")
        lo = min(intensities, default=1.0) / 8
        hi = max(intensities, default=1.0) * 8
        if peak_tflops:
            hi = max(hi, 4 * peak_tflops * 1e3 / roof_gbps) if roof_gbps else hi
        if roof_gbps:
            top = peak_tflops * 1e3 if peak_tflops else None
            ridge = top / roof_gbps if top else hi
            ax.plot([lo, ridge], [roof_gbps * lo, roof_gbps * ridge], color="k", lw=1.5,
                    label=f"memory roof (copy) {roof_gbps:,.0f} GB/s")
            if top:
                ax.plot([ridge, hi], [top, top], color="firebrick", lw=1.5,
                        label=f"fp32 compute roof {peak_tflops:g} TFLOP/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Minor-tick labels on a narrow log axis overlap into an unreadable row.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(lo, hi)
        ax.set_title(direction, fontsize=10)
        ax.set_xlabel("arithmetic intensity (FLOP/byte)")
        ax.set_ylabel("attained GFLOP/s")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].legend(fontsize=7, loc="upper left")
    suffix = "" if peak_tflops else " (no compute roof: unknown device, see --peak-tflops)"
    _save(fig, f"{title}: roofline{suffix}", path)


def plot_speedup(rows, path, title):
    """triton_instnorm's speedup over each measured baseline, one panel per direction; bars are
    geometric means over each class's shapes and dtypes."""
    directions = _present(rows, "direction", model.DIRECTIONS)
    classes = sorted({r["shape_class"] for r in rows}, key=class_order)
    baselines = [b for b in BASELINES if any(r["provider"] == b for r in rows)]
    ratios = {b: speedups(rows, b) for b in baselines}
    fig, axes = _grid(1, len(directions), width=max(4.5, 0.55 * len(classes) + 1.5))
    for ax, direction in zip(axes[0], directions):
        def value(cls, baseline):
            v = geomean(v for (c, _, d), vals in ratios[baseline].items()
                        if c == cls and d == direction for v in vals)
            return None if v != v else v
        _grouped_bars(ax, classes, {b: (f"vs {b}", COLORS[b]) for b in baselines}, value,
                      "speedup (baseline ms / triton ms)", direction, "no baseline measured",
                      "{:.2f}")
        ax.axhline(1.0, color="k", lw=1)
    _save(fig, f"{title}: triton_instnorm speedup (geometric mean per class)", path)


def draw_all(rows, plots_dir, title, prefix, peak_tflops=None) -> list[str]:
    """Draw the three plots as ``<plots_dir>/<prefix>_<plot>.png`` (prefix: device slug)."""
    os.makedirs(plots_dir, exist_ok=True)
    paths = [os.path.join(plots_dir, f"{prefix}_{name}") for name in PLOT_FILES]
    plot_bandwidth_vs_plane(rows, paths[0], title)
    plot_roofline(rows, paths[1], title, peak_tflops)
    plot_speedup(rows, paths[2], title)
    return paths


# --------------------------------------------------------------------------- training steps

VARIANT_COLORS = {(PYTORCH, "eager"): "tab:orange", (PYTORCH, "compile"): "tab:green",
                  (OURS, "eager"): "tab:blue", (OURS, "compile"): "navy"}


def draw_training(rows, plots_dir, title, prefix) -> list[str]:
    """``<plots_dir>/<prefix>_models.png``: ms per step, speedup and peak memory per network."""
    os.makedirs(plots_dir, exist_ok=True)
    networks = list(dict.fromkeys(r["network"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by_key = {(r["network"], r["variant"], r["mode"]): r for r in rows}

    def column(name):
        def value(network, series):
            text = by_key.get((network, *series), {}).get(name)
            return float(text) if text else None
        return value

    series = {(v, m): (f"{v} {m}", VARIANT_COLORS[v, m]) for m in modes for v in VARIANTS}
    fig, axes = _grid(3, 1, width=max(6.0, 1.1 * len(networks) + 2), height=3.4)
    _grouped_bars(axes[0][0], networks, series, column("ms_per_step"), "ms per training step",
                  "step time")
    speedup = column("speedup_vs_pytorch")
    _grouped_bars(axes[1][0], networks, {m: (m, VARIANT_COLORS[OURS, m]) for m in modes},
                  lambda n, m: speedup(n, (OURS, m)),
                  "PyTorch ms / triton_instnorm ms", "speedup (same mode)")
    axes[1][0].axhline(1.0, color="k", lw=1)
    _grouped_bars(axes[2][0], networks, series, column("peak_mem_mb"), "MiB", "peak GPU memory")
    path = os.path.join(plots_dir, f"{prefix}_models.png")
    _save(fig, f"{title}: training step of instance-norm networks", path)
    return [path]
