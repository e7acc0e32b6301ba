"""The bandwidth report: ``python -m perf.report [options]`` from the repository root.

- CUDA GPU: times every shape class x dtype x direction x provider (perf/providers.py, with
  perf/timing.py), writes ``perf/results/<device>.csv`` (rows of the cases measured replace their
  old rows) and ``.md``, draws ``plots/<device>_*.png``.
- No GPU and no ``--smoke``: one line, and the plots redrawn from the newest committed CSV.
- ``--smoke``: the whole pipeline on tiny shapes into a temp dir; without a GPU through Triton's
  interpreter (the numbers mean nothing) and without torch_compile unless ``--providers`` asks.

The CSV is rewritten after every (shape, dtype), so a run stopped by ``--budget`` or killed keeps
what it measured. A failed measurement (out of memory, a compile error, a peer that does not
match PyTorch) is logged, counted in the summary and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

from perf import cli, files, machine, model, providers, shapes, summary
from perf.schema import (BANDWIDTH_COLUMNS, BANDWIDTH_KEY, CLUSTERS, COMPILE, NORM_PROVIDERS,
                         PEER_PROVIDERS, PROVIDERS, ROOF, rank)
from perf.timing import time_ms


def sort_key(row: dict):
    return (shapes.class_order(row["shape_class"]),
            math.prod(model.shape_from_str(row["shape"])), row["shape"],
            rank(model.DTYPES, row["dtype"]), rank(model.DIRECTIONS, row["direction"]),
            rank(PROVIDERS, row["provider"]))


def default_providers(interpret: bool) -> list[str]:
    """Ours, eager, torch.compile and the peers; without a GPU not torch.compile (inductor's CPU
    compiles take minutes); triton_instnorm_clusters only when asked for."""
    return [p for p in NORM_PROVIDERS + PEER_PROVIDERS if not (interpret and p == COMPILE)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m perf.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=cli.csv_list(shapes.SHAPE_CLASSES),
                   help="comma-separated shape classes (default all: "
                        f"{','.join(shapes.SHAPE_CLASSES)})")
    p.add_argument("--dtypes", type=cli.csv_list(model.DTYPES), default=model.DTYPES,
                   help=f"comma-separated (default {','.join(model.DTYPES)})")
    p.add_argument("--directions", type=cli.csv_list(model.DIRECTIONS), default=model.DIRECTIONS,
                   help=f"comma-separated (default {','.join(model.DIRECTIONS)})")
    p.add_argument("--providers", type=cli.csv_list(PROVIDERS),
                   help=f"comma-separated (default: {','.join(default_providers(False))}; "
                        "without a GPU all but torch_compile). copy, the roof, is always "
                        "measured; peers and triton_instnorm_clusters that cannot run here are "
                        "reported as unavailable with the reason.")
    p.add_argument("--module", action="store_true",
                   help="time triton_instnorm through its InstanceNorm{1,2,3}d modules "
                        "instead of the functional instance_norm")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="start no (shape, dtype) but the first after this many seconds; "
                        "what was measured is written")
    p.add_argument("--warm", action="store_true",
                   help="run every provider and direction once per case, time and write nothing: "
                        "fills Triton's and inductor's on-disk caches (several at once, before a "
                        "timed run, compile in parallel)")
    p.add_argument("--peak-tflops", type=float,
                   help="fp32 compute roof for the roofline plot (default: known-device table)")
    cli.add_output_args(p, files.RESULTS_DIR)
    return p.parse_args(argv)


def measure(args, chosen, device, device_name, save):
    """Time every case; ``save(rows)`` after each (shape, dtype). (rows, failures, {provider:
    {dtype: why it could not run}}, cases left out by the budget)."""
    env = machine.environment(device_name)
    work = [(cls, shape, dtype) for cls in shapes.select_classes(args.classes)
            for shape in (cls.smoke_shapes if args.smoke else cls.shapes) for dtype in args.dtypes]
    rows, failures, unavailable, start = [], [], {}, time.monotonic()

    def emit(cls, shape, dtype, direction, provider, ms, roof):
        num_bytes = (model.copy_bytes(shape, dtype) if provider == ROOF
                     else model.norm_bytes(shape, dtype, direction))
        rate = model.gbps(num_bytes, ms)
        rows.append({**env, "shape_class": cls.name, "shape": model.shape_to_str(shape),
                     "dtype": dtype, "direction": direction, "provider": provider,
                     "ms": f"{ms:.6g}", "gbps": f"{rate:.6g}",
                     "pct_of_roof": f"{100.0 * rate / roof:.4g}"})
        return rate

    for done, (cls, shape, dtype) in enumerate(work):
        if done and args.budget is not None and time.monotonic() - start > args.budget:
            cli.log(f"budget of {args.budget:g} s spent: {len(work) - done} of {len(work)} "
                    "(shape, dtype) cases left out")
            return rows, failures, unavailable, len(work) - done
        label = f"[{done + 1}/{len(work)}] {cls.name} {model.shape_to_str(shape)} {dtype}"
        try:
            case = providers.make_case(shape, dtype, cls.memory_format, device)
        except Exception as exc:  # e.g. out of memory on a smaller GPU
            failures.append(f"{label}: allocation failed: {exc}")
            cli.log(f"{label}: SKIPPED ({type(exc).__name__}: {exc})")
            continue
        # The roof: one copy per (shape, dtype), a row per direction so every group is complete.
        if not args.warm:
            copy_ms = time_ms(providers.copy_fn(case), device, args.smoke)
            roof = model.gbps(model.copy_bytes(shape, dtype), copy_ms)
            for direction in args.directions:
                emit(cls, shape, dtype, direction, ROOF, copy_ms, roof)
            cli.log(f"{label} copy: {copy_ms:.4f} ms {roof:.1f} GB/s")
        for provider in chosen:
            try:
                fn, inputs = providers.norm_fn(provider, case, args.module)
            except providers.Unavailable as exc:
                unavailable.setdefault(provider, {})[dtype] = str(exc)
                cli.log(f"{label} {provider}: unavailable ({exc})")
                continue
            except Exception as exc:
                failures.append(f"{label} {provider}: setup failed: {exc}")
                cli.log(f"{label} {provider}: FAILED setup ({type(exc).__name__}: {exc})")
                continue
            for direction in args.directions:
                try:
                    timed = providers.direction_fn(fn, inputs, case.dy, direction)
                    if args.warm:
                        timed()
                        cli.log(f"{label} {direction} {provider}: ran")
                        continue
                    ms = time_ms(timed, device, args.smoke)
                except Exception as exc:
                    failures.append(f"{label} {direction} {provider}: {type(exc).__name__}: {exc}")
                    cli.log(f"{label} {direction} {provider}: FAILED\n"
                            + traceback.format_exc(limit=3))
                    continue
                rate = emit(cls, shape, dtype, direction, provider, ms, roof)
                cli.log(f"{label} {direction} {provider}: {ms:.4f} ms {rate:.1f} GB/s "
                        f"{100 * rate / roof:.0f}% of copy")
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(rows)
    return rows, failures, unavailable, 0


def status(name: str, reason: str | None, rows, failures, unavailable) -> str:
    """"unavailable: <why>" or "measured: N rows (dtypes)[; unavailable for ...][; failures]"."""
    if reason is not None:
        return f"unavailable: {reason}"
    mine = [r for r in rows if r["provider"] == name]
    dtypes = sorted({r["dtype"] for r in mine}, key=model.DTYPES.index)
    parts = [f"measured: {len(mine)} rows ({', '.join(dtypes) or 'none'})"]
    by_reason = {}
    for dtype, why in unavailable.get(name, {}).items():
        by_reason.setdefault(why, []).append(dtype)
    parts += [f"unavailable for {', '.join(d)}: {why}" for why, d in by_reason.items()]
    failed = [f for f in failures if f" {name}:" in f]
    return "; ".join(parts + ([f"{len(failed)} failed: {failed[0]}"] if failed else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        def draw(rows, device):
            from perf import plots
            return plots.draw_all(rows, args.plots or files.PLOTS_DIR, device,
                                  files.slugify(device),
                                  args.peak_tflops or model.known_peak_tflops(device))
        return cli.redraw(args.out or files.RESULTS_DIR, BANDWIDTH_COLUMNS, draw)
    device, device_name, interpret = machine.start_device("python -m perf.report --smoke")
    import triton

    chosen = [p for p in args.providers or default_providers(interpret) if p != ROOF]
    optional = {p: providers.unavailable_reason(p, interpret) for p in chosen
                if p in PEER_PROVIDERS or p == CLUSTERS}
    chosen = [p for p in chosen if optional.get(p) is None]
    peers = {p: why for p, why in optional.items() if p in PEER_PROVIDERS}

    out_dir, plots_dir = cli.output_dirs(args, files.RESULTS_DIR, "instnorm-perf-smoke-")
    slug = files.slugify(device_name)
    csv_path, md_path = os.path.join(out_dir, f"{slug}.csv"), os.path.join(out_dir, f"{slug}.md")

    def save(rows):
        return files.write_csv(csv_path, rows, BANDWIDTH_COLUMNS, BANDWIDTH_KEY, sort_key,
                               not args.fresh)

    print(f"Measuring on {device_name}: {len(shapes.select_classes(args.classes))} shape classes, "
          f"dtypes {','.join(args.dtypes)}, providers {','.join(chosen + [ROOF])}"
          f"{' (smoke, Triton interpreter)' if interpret else ' (smoke)' if args.smoke else ''}",
          file=sys.stderr)
    if peers:
        print(providers.status_line(peers), file=sys.stderr)
    if CLUSTERS in optional:
        cli.log(f"{CLUSTERS}: {optional[CLUSTERS] or 'available'}")
    if args.warm:
        failures = measure(args, chosen, device, device_name, lambda rows: None)[1]
        cli.log(f"warmed: {len(failures)} failure(s)")
        return 1 if failures else 0
    new_rows, failures, unavailable, left_out = measure(args, chosen, device, device_name, save)
    rows = save(new_rows)

    notes = [f"torch {torch.__version__}, triton {triton.__version__}",
             "triton_instnorm timed through the "
             + ("InstanceNorm modules (--module)" if args.module else "functional instance_norm")]
    if interpret:
        notes.append("SMOKE RUN on CPU through the Triton interpreter: the numbers mean nothing")
    if CLUSTERS in optional:
        notes.append(f"{CLUSTERS} (TRITON_INSTNORM_CLUSTERS=1): "
                     + status(CLUSTERS, optional[CLUSTERS], new_rows, failures, unavailable))
    if left_out:
        notes.append(f"--budget {args.budget:g} s spent: {left_out} (shape, dtype) cases "
                     "not measured")
    notes += [f"overall geometric-mean speedup vs {b}: {v:.2f}x"
              for b, v in summary.overall_speedups(rows).items()]
    if failures:
        notes.append(f"{len(failures)} measurement(s) failed: " + "; ".join(failures[:5]))
    text = summary.bandwidth(rows, f"Instance norm bandwidth on {device_name}", notes, peers={
        p: status(p, why, new_rows, failures, unavailable) for p, why in peers.items()})
    text += summary.traffic_section(files.TRAFFIC_TABLE)  # bytes moved / minimum (CPU count)
    with open(md_path, "w") as f:
        f.write(text)
    pngs, problems = cli.draw("draw_all", rows, plots_dir, device_name, slug,
                              args.peak_tflops or model.known_peak_tflops(device_name))
    written = [f"{csv_path} ({len(new_rows)} new rows, {len(rows)} total)", md_path, *pngs]
    return cli.finish(text, written, failures + problems)


if __name__ == "__main__":
    sys.exit(main())
