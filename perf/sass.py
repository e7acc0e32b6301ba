"""The instruction audit: SASS thread-instructions per element of every kernel pass the benchmark
networks and shape classes launch, against the memory roof's instruction budget (no GPU needed).

    python -m perf.sass                       # networks and shape classes, sm_90 and sm_100
    python -m perf.sass --networks unet3d --no-classes --archs sm_90

For each network of perf/networks.py (bfloat16 under autocast: bf16 activations, float32
parameters; and float32), its training step (forward storing the statistics, backward) and its
eval forward, and for each shape class of perf/shapes.py, the real host code plans the launches
(perf/aot.py), each launch is compiled for the GPU (``h100``: sm_90, ``b200``: sm_100, clusters
off and on) and its cubin disassembled; perf/sass_flow.py counts the instructions a thread
executes once per program (*straight*) and per loop iteration, cold paths left out.

Per pass (one launch over planes), with T = 32 x warps x CTAs threads per program::

    instructions / element = T x (programs x straight + sum over loops of body x iterations)
                             / (N x C x HW)

iterations: every program's tiles, ceil(chunk / BLOCK_HW) for each chunk of its planes (each
loop of a pass sweeps the program's part of its planes once). The passes over per-plane buffers
(the combine passes, the sums over n, the running-statistics update) are listed apart, without
a ratio: they move a few bytes per plane.

bytes / element: what the pass reads and writes per element (``SWEEPS``: a looped pass reads x
twice); the budget is ``INSTRUCTIONS_PER_BYTE`` x that (H100: 128 thread-instructions issued per
SM-cycle against 3.35 TB/s / 132 SMs / 1.98 GHz = 12.8 bytes per SM-cycle, so ~10 per byte; the
sm_100 counts are judged against the same budget). ratio = instructions / budget: above 1 a pass
cannot reach the memory roof even issuing every cycle. A network's *time factor* at issue
efficiency e weights each pass by its bytes, taking ``max(1, ratio / e)`` of its byte time:
1.00 means instruction issue never limits it. These are predictions from the compiled code, not
measurements.

Writes ``perf/results/sass.md`` (tables) and ``perf/results/sass.json`` (what
tests/test_sass_audit.py pins).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import tempfile
from pathlib import Path

from perf import aot, shapes

H100_BYTES_PER_SM_CYCLE = 3.35e12 / 132 / 1.98e9
INSTRUCTIONS_PER_BYTE = 128 / H100_BYTES_PER_SM_CYCLE  # ~10
EFFICIENCIES = (1.0, 0.7)
ARCHS = {"sm_90": "h100", "sm_100": "b200"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
TORCH_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}
PER_PLANE = ("_fwd_combine", "_bwd_combine", "_sum_partials_over_n", "_update_running_stats")
# constants.FROM_*, by value (this module is imported without the package's kernels)
FROM = {0: "tile", 1: "plane", 2: "partials", 3: "running"}

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------ what is launched

def network_layers(name: str):
    """[(kind, shape, affine, count)] of the instance-norm calls one forward of the network makes
    at full size (traced on the meta device: shapes only): kind "norm" or "adain"."""
    import torch

    from perf import networks

    net = networks.NETWORKS[name]
    kwargs, shape = net.sizes(False)
    with torch.device("meta"):
        task = getattr(networks, net.task)(**kwargs)
    calls = collections.Counter()

    def hook(module, inputs, _output):
        if isinstance(module, networks.AdaINLayer):
            calls[("adain", tuple(inputs[0].shape), None)] += 1
        else:
            calls[("norm", tuple(inputs[0].shape), module.affine)] += 1

    for module in task.modules():
        if isinstance(module, (torch.nn.modules.instancenorm._InstanceNorm, networks.AdaINLayer)):
            module.register_forward_hook(hook)
    first = torch.empty(shape, device="meta")
    if net.inputs == "segmentation":
        second = torch.empty((shape[0], *shape[2:]), dtype=torch.long, device="meta")
    else:
        second = torch.empty(shape, device="meta")
    with torch.no_grad():
        task(first, second)
    return [(kind, shape, affine, n) for (kind, shape, affine), n in calls.items()], net


def layer_specs(kind, shape, affine, dtype, mode, layout, device, clusters):
    """The host calls (perf/aot.py variants) of one layer call: ``mode`` "train" (forward keeping
    the statistics, backward) or "eval" (forward only). 16-bit networks keep float32 parameters
    (autocast)."""
    on = dict(layout=layout, device=device, clusters=clusters)
    if kind == "adain":  # the style's statistics, then the content normalized per sample; the
        # features are frozen: no statistics kept, no backward (perf/networks.py)
        return [aot.fwd(dtype, shape, w=None, b=None, write_y=False, **on),
                aot.fwd(dtype, shape, w="fp32", b="fp32", per_sample=True, store_stats=False,
                        **on)]
    params = "fp32" if affine else None
    if mode == "eval":
        return [aot.fwd(dtype, shape, w=params, b=params, store_stats=False, **on)]
    return [aot.fwd(dtype, shape, w=params, b=params, **on),
            aot.bwd(dtype, shape, w=params, b=params, need_dw=bool(affine),
                    need_db=bool(affine), **on)]


def class_specs(shape_class, dtype, device):
    layout = {"contiguous": "contiguous"}.get(shape_class.memory_format, "channels_last")
    out = []
    for shape in shape_class.shapes:
        on = dict(layout=layout, device=device)
        out += [aot.fwd(dtype, shape, **on), aot.bwd(dtype, shape, **on),
                aot.fwd(dtype, shape, store_stats=False, **on)]
    return out


ACTIVATION_SHAPE = (4, 128, 64, 64)
ACTIVATIONS = {1: "relu", 2: "leaky_relu", 3: "silu", 4: "gelu"}


def activation_specs(device):
    return [s for act in ACTIVATIONS for s in (
        aot.fwd("bf16", ACTIVATION_SHAPE, w="fp32", b="fp32", activation=act, device=device),
        aot.bwd("bf16", ACTIVATION_SHAPE, w="fp32", b="fp32", activation=act, device=device))]


# --------------------------------------------------------------------------------- the pass model

def _const(report, name, default=None):
    value = report["constexprs"].get(name)
    if value is None or value == "None":
        return default
    return int(value) if value.lstrip("-").isdigit() else value


def sweeps(report):
    """(plane tensors read, written) per element, and the loops the pass must have: the sweep
    model the budget is taken from (a tensor read twice counts twice, as in perf/traffic.py)."""
    kernel = report["kernel"]
    source = _const(report, "STATS_FROM", _const(report, "SUMS_FROM"))
    writes_y = report["constexprs"].get("y") != "None"
    if kernel == "_fwd":
        reads = 2 if source == 1 else 1
        loops = (2 if writes_y else 1) if source == 1 else (1 if source in (2, 3) and writes_y
                                                             else 0)
        return reads, int(writes_y), loops
    if kernel == "_fwd_split_stats":
        return 1, 0, 0 if report["constexprs"].get("TILE_HW", "0") != "0" else 1
    if kernel == "_bwd":
        return (4 if source == 1 else 2), 1, {0: 0, 1: 2, 2: 1}[source]
    if kernel == "_bwd_split_sums":
        return 2, 0, 1
    if kernel == "_stats_bwd":
        return 1, 1, 1
    raise ValueError(kernel)


def pass_kind(report, layout):
    """A name for the pass: what it computes, from where, on which tile (and the activation it
    applies, the layout it reads)."""
    kernel = report["kernel"]
    source = FROM.get(_const(report, "STATS_FROM", _const(report, "SUMS_FROM")))
    cl = " (channels_last)" if layout == "channels_last" else ""
    act = ACTIVATIONS.get(_const(report, "ACTIVATION", 0))
    cl += f" + {act}" if act else ""
    if kernel in ("_fwd", "_bwd"):
        direction = "forward" if kernel == "_fwd" else "backward"
        if kernel == "_fwd" and report["constexprs"].get("y") == "None":
            return "statistics only" + cl
        if source == "tile":
            where = "cluster" if report["num_ctas"] > 1 else "tile"
            planes = _const(report, "BLOCK_R")
            many = f", {planes} planes/program" if planes > 1 else ""
            kept = "" if kernel == "_bwd" or report["constexprs"].get("Stats") != "None" \
                else ", no statistics kept"
            return f"{where} {direction}{many}{kept}{cl}"
        return {"plane": f"looped {direction}", "partials": f"split {direction}",
                "running": "normalize with running statistics"}[source] + cl
    return {"_fwd_split_stats": "split statistics", "_bwd_split_sums": "split backward sums",
            "_stats_bwd": "statistics backward"}[kernel] + cl


def _chunk_lengths(hw, chunks, block_hw):
    chunk = math.ceil(math.ceil(hw / chunks) / block_hw) * block_hw
    return [min(max(hw - k * chunk, 0), chunk) for k in range(chunks)]


def measure(report, dtype, layout):
    """The pass's row: instructions per element, bytes per element, budget, ratio."""
    s = report["sass"]
    planes, _, hw, _ = report["geometry"]
    block_hw = _const(report, "BLOCK_HW")
    threads = 32 * report["num_warps"] * report["num_ctas"]
    row_programs, chunks = report["grid"][0], report["grid"][1]
    iterations = row_programs * sum(math.ceil(n / block_hw)
                                    for n in _chunk_lengths(hw, chunks, block_hw))
    executed = row_programs * chunks * s["straight"] + iterations * sum(
        loop["body"] for loop in s["loops"])
    elements = planes * hw
    reads, writes, loops = sweeps(report)
    per_element = threads * executed / elements
    bytes_per_element = (reads + writes) * ITEMSIZE[dtype]
    budget = INSTRUCTIONS_PER_BYTE * bytes_per_element
    problems = []
    if s["nested"]:
        problems.append("nested loops")
    if len(s["loops"]) != loops:
        problems.append(f"{len(s['loops'])} loops, the sweep model has {loops}")
    return dict(kind=pass_kind(report, layout), kernel=report["kernel"], dtype=dtype,
                arch=report["arch"], elements=elements, per_element=per_element,
                bytes_per_element=bytes_per_element, budget=budget, ratio=per_element / budget,
                registers=report["registers"], spills=report["spill_stores"],
                block=(_const(report, "BLOCK_R"), _const(report, "TILE_HW", 0) or block_hw),
                warps=report["num_warps"],
                ctas=report["num_ctas"], straight=s["straight"],
                loops=[loop["body"] for loop in s["loops"]], problems=problems,
                shuffles=threads * (row_programs * chunks * s["kinds"]["shfl"]) / elements
                if not s["loops"] else None)


def time_factor(rows, efficiency):
    """Byte-weighted time of the passes over their byte time (each max(1, ratio / e))."""
    weight = sum(r["elements"] * r["bytes_per_element"] * r["count"] for r in rows)
    time = sum(r["elements"] * r["bytes_per_element"] * r["count"]
               * max(1.0, r["ratio"] / efficiency) for r in rows)
    return time / weight if weight else float("nan")


# ------------------------------------------------------------------------------------ the audit

def workloads(network_names, class_names, archs):
    """{(group, name, dtype, mode, arch, clusters): [(spec, count)]} and the unique specs."""
    from perf import networks

    out = {}
    for arch in archs:
        device = ARCHS[arch]
        for clusters in (False, True):
            for name in network_names:
                layers, net = network_layers(name)
                layout = "channels_last" if net.memory_format != "contiguous" else "contiguous"
                for dtype in ("bf16", "fp32"):
                    for mode in ("train", "eval"):
                        out[("network", name, dtype, mode, arch, clusters)] = [
                            (spec, n) for kind, shape, affine, n in layers
                            for spec in layer_specs(kind, shape, affine, dtype, mode, layout,
                                                    device, clusters)]
        for name in class_names:
            for dtype in ("bf16", "fp32"):
                out[("class", name, dtype, "fwd+bwd+eval", arch, False)] = [
                    (spec, 1) for spec in class_specs(shapes.SHAPE_CLASSES[name], dtype, device)]
        out[("activation", "tile (4, 128, 64, 64)", "bf16", "fwd+bwd", arch, False)] = [
            (spec, 1) for spec in activation_specs(device)]
    assert set(network_names) <= set(networks.NETWORKS)
    unique = {aot.spec_name(s): s for rows in out.values() for s, _ in rows}
    return out, list(unique.values())


def audit(network_names, class_names, archs, jobs=2, workdir=None):
    """Compiles what the workloads launch and returns {"triton", "passes", "workloads"}."""
    groups, specs = workloads(network_names, class_names, archs)
    with tempfile.TemporaryDirectory(prefix="triton_instnorm_sass_") as tmp:
        out = aot.run_worker(specs, workdir or tmp, jobs=jobs, sass=True, timeout=3600)
    if out["skip"]:
        raise SystemExit(f"AOT compilation unavailable: {out['skip']}")
    failed = [r for r in out["results"] if not r["ok"]]
    if failed:
        raise SystemExit("compile errors:\n" + "\n".join(
            f"{r['kernel']} [{r['spec']}]: {r['error'][-500:]}" for r in failed))
    by_spec = collections.defaultdict(list)
    for r in out["results"]:
        by_spec[r["spec"]].append(r)
    passes, table = {}, {}
    for key, rows in groups.items():
        measured = []
        for spec, count in rows:
            for r in by_spec[aot.spec_name(spec)]:
                if r["kernel"] in PER_PLANE:
                    continue
                row = measure(r, spec["dtype"], spec.get("layout", "contiguous"))
                row["shape"] = "x".join(map(str, spec["shape"]))
                row["params"] = _params(spec)
                row["count"] = count
                row["id"] = (f"{row['arch']} {row['kind']} {row['dtype']} {row['shape']} "
                             f"{row['params']}")
                passes[row["id"]] = row
                measured.append(row)
        table[key] = measured
    return {"triton": out["triton"], "passes": passes, "workloads": table}


def _params(spec):
    """The affine parameters a variant passes: "w, b fp32", "per-sample fp32", "none"."""
    if spec["op"] == "stats_backward" or spec.get("w") is None:
        return "none"
    dtype = spec["dtype"] if spec["w"] == "same" else spec["w"]
    return f"{'per-sample' if spec.get('per_sample') else 'w, b'} {dtype}"


def _fmt(x, digits=2):
    return f"{x:.{digits}f}"


def render(result):
    """The markdown report."""
    lines = [
        "# Instructions per element of every kernel pass, from the compiled SASS (no GPU)",
        "",
        f"- triton {result['triton']}; `python -m perf.sass` (method: perf/sass.py, "
        "perf/sass_flow.py); predictions from the compiled code, nothing here is measured on "
        "a GPU",
        f"- budget: {INSTRUCTIONS_PER_BYTE:.2f} thread-instructions per byte moved (H100: 128 "
        "per SM-cycle against 12.8 bytes per SM-cycle), for sm_90 and sm_100 alike; ratio = "
        "instructions / budget",
        "- time factor at e: byte-weighted max(1, ratio / e) over the passes, e = issue "
        "efficiency (1.00: instruction issue never limits the pass)",
        "",
        "## Networks (perf/networks.py at full size)",
        "",
        "| network | dtype | step | arch | clusters | factor at 100% | at 70% | worst pass "
        "(ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (group, name, dtype, mode, arch, clusters), rows in result["workloads"].items():
        if group != "network":
            continue
        worst = max(rows, key=lambda r: r["ratio"])
        lines.append(f"| {name} | {TORCH_DTYPE[dtype]} | {mode} | {arch} | "
                     f"{'on' if clusters else 'off'} | {_fmt(time_factor(rows, 1.0))} | "
                     f"{_fmt(time_factor(rows, 0.7))} | {worst['kind']} "
                     f"{worst['shape']} ({_fmt(worst['ratio'])}) |")
    for title, group in (("Passes of the networks", "network"),
                         ("Passes of the shape classes (perf/shapes.py)", "class"),
                         ("Fused activations (bf16)", "activation")):
        seen = {r["id"]: r for key, rows in result["workloads"].items() if key[0] == group
                for r in rows}
        lines += ["", f"## {title}", "",
                  "| arch | pass | dtype | shape | affine | tile (planes x elements) | "
                  "warps x CTAs | registers | spills | instructions / element | bytes / element "
                  "| budget | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(seen.values(), key=lambda r: (r["arch"], r["kind"], r["dtype"],
                                                      r["elements"])):
            note = f" ({'; '.join(r['problems'])})" if r["problems"] else ""
            lines.append(
                f"| {r['arch']} | {r['kind']} | {TORCH_DTYPE.get(r['dtype'], r['dtype'])} | "
                f"{r['shape']} | {r['params']} | {r['block'][0]} x {r['block'][1]} | "
                f"{r['warps']} x {r['ctas']} "
                f"| {r['registers']} | {r['spills']} | {_fmt(r['per_element'], 1)}{note} | "
                f"{r['bytes_per_element']} | {_fmt(r['budget'], 0)} | {_fmt(r['ratio'])} |")
    return "\n".join(lines) + "\n"


def summary(result):
    """What tests/test_sass_audit.py pins: per pass its instructions per element and ratio, per
    network workload its time factors."""
    return {
        "triton": result["triton"],
        "passes": {k: {"per_element": round(r["per_element"], 3), "ratio": round(r["ratio"], 4),
                       "registers": r["registers"], "spills": r["spills"]}
                   for k, r in sorted(result["passes"].items())},
        "networks": {" ".join(map(str, k[1:4] + (k[4], "clusters" if k[5] else "default"))): {
            f"factor_{int(e * 100)}": round(time_factor(rows, e), 4) for e in EFFICIENCIES}
            for k, rows in result["workloads"].items() if k[0] == "network"},
    }


def main(argv=None):
    from perf import networks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default=",".join(networks.NETWORKS))
    parser.add_argument("--classes", default=",".join(shapes.SHAPE_CLASSES))
    parser.add_argument("--no-classes", action="store_true")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    names = [n for n in args.networks.split(",") if n]
    classes = [] if args.no_classes else [c for c in args.classes.split(",") if c]
    shapes.select_classes(classes)
    result = audit(names, classes, args.archs.split(","), jobs=args.jobs)
    text = render(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sass.md").write_text(text)
    (out / "sass.json").write_text(json.dumps(summary(result), indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
