"""``explain``: the launch plan of a call, printed: every pass, its programs per SM, the path the
planes take and why, and the bytes each pass reads and writes against the minimum.

    import triton_instnorm as tin
    print(tin.explain(shape=(4, 32, 256, 256), dtype=torch.bfloat16, gpu="a100"))
    print(tin.explain(x))                   # x's shape, strides, dtype and GPU

It plans without launching anything (on the CPU too). The bytes are what the kernels load and
store, lane by lane, on ordinary data (the overflow rescan of a plane whose sums leave the finite
range is not counted): the traffic audit's counts (perf/counting.py; a test holds the two
equal). The minimum reads x (and dy) and writes y (dx) once, reads the parameters and writes
(reads) the per-plane statistics once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import activations, device, heuristics, launch
from .kernels.constants import (
    ACT_NONE, FROM_PARTIALS, FROM_LOOP, FROM_RUNNING, FROM_TILE, NUM_FWD_PARTIALS, NUM_STATS,
    NUM_SUMS,
)


@dataclass(frozen=True)
class Explanation:
    """The plans of a training step (or an eval forward) and their bytes; ``str()`` prints them.

    ``plans``: {"forward": Plan, "backward": Plan}; ``bytes``: {direction: [(kernel, read,
    written)] in launch order}; ``minimum``: {direction: bytes}."""

    shape: tuple
    dtype: torch.dtype
    layout: str
    gpu: device.Device
    flags: str
    plans: dict
    bytes: dict
    minimum: dict

    def __str__(self):
        lines = [f"instance norm of {tuple(self.shape)} {str(self.dtype).replace('torch.', '')}"
                 f" ({self.layout}), {self.flags}, on {self.gpu.name} ({self.gpu.sms} SMs)"]
        for direction, plan in self.plans.items():
            lines.append(f"{direction}: {plan.path} - {reason(plan)}")
            lines.append(f"  {'pass':<22}{'grid':>10}{'per SM':>8}  {'tile':<14}{'warps':>5}"
                         f"{'read':>14}{'written':>14}")
            for step, (_, read, written) in zip(plan.passes, self.bytes[direction]):
                o = step.options
                tile = (f"{o['BLOCK_R']} x "
                        f"{o.get('BLOCK_CHUNKS', o.get('TILE_HW') or o.get('BLOCK_HW'))}"
                        if "BLOCK_R" in o else f"{o['BLOCK_C']} ch")
                ctas = o.get("num_ctas", 1)
                grid = "x".join(str(g) for g in step.grid if g != 1 or len(step.grid) == 1)
                lines.append(f"  {step.kernel:<22}{grid or '1':>10}"
                             f"{step.programs * ctas / self.gpu.sms:>8.2f}  "
                             f"{tile + (f' ({ctas} CTAs)' if ctas > 1 else ''):<14}"
                             f"{o.get('num_warps', 4):>5}{read:>14,}{written:>14,}")
            moved = sum(r + w for _, r, w in self.bytes[direction])
            lines.append(f"  moved {moved:,} bytes = {moved / self.minimum[direction]:.2f} x the "
                         f"minimum {self.minimum[direction]:,}")
        return "\n".join(lines)


def explain(input: torch.Tensor | None = None, *, shape=None, dtype=torch.float32,
            memory_format=torch.contiguous_format, gpu: str | None = None, affine: bool = True,
            activation: str | None = None, residual: bool = False, training: bool = True,
            clusters: bool | None = None) -> Explanation:
    """The plan of ``instance_norm`` on ``input`` (its shape, strides, dtype and GPU), or on a
    tensor of ``shape``, ``dtype`` and ``memory_format``; forward and, in training, backward.

    ``gpu``: a name of ``device.EMULATED`` ("h100", "a100", "mi300x", ...) instead of the
    tensor's GPU (a CPU tensor's is the emulated one). ``affine``: per-channel weight and bias of
    the input's dtype. ``training``: statistics of the input (else the running statistics, held
    in the input's dtype). ``clusters``: cluster launches on or off (default: as a launch on that
    GPU decides, ``TRITON_INSTNORM_CLUSTERS``)."""
    if input is None:
        if shape is None:
            raise TypeError("explain() needs a tensor or a shape")
        input = torch.empty(shape, dtype=dtype, device="meta").contiguous(
            memory_format=memory_format)
    # planned on a meta tensor of the same layout: nothing is copied or read
    x = launch.kernel_layout(torch.empty_strided(input.shape, input.stride(), dtype=input.dtype,
                                                 device="meta"))
    if gpu is None:
        where = device.describe(input.device)
    elif gpu.lower() in device.EMULATED:
        where = device.EMULATED[gpu.lower()]
    else:
        raise ValueError(f"gpu={gpu!r}: expected one of {', '.join(device.EMULATED)}")
    if clusters is None:  # as a launch of ``input`` would decide on that GPU
        clusters = device.cluster_launch(where, real=input.is_cuda)
    act = activations.code(activation)
    y = torch.empty_like(x)
    r = y if residual else None

    def plan(op, flags, *tensors):
        return launch.layout(op, flags, *tensors, gpu=where, clusters=clusters).plan

    plans = {"forward": plan(heuristics.FORWARD, (training, True, True, residual, act), x, y, r)}
    if training:
        plans["backward"] = plan(heuristics.BACKWARD, (training, False, True, residual, act,
                                                       affine, affine), x, y, y, r, r)
    param = x.element_size() if affine else 0
    return Explanation(
        tuple(x.shape), x.dtype, _layout_name(x), where,
        ", ".join(f for f in (("affine" if affine else "no affine"), activation,
                              "residual" if residual else None,
                              "training" if training else "eval") if f),
        plans, {d: pass_bytes(p, param, param) for d, p in plans.items()},
        {d: minimum_bytes(p, param) for d, p in plans.items()})


def reason(plan: heuristics.Plan) -> str:
    """Which threshold of heuristics.py decided the plan's path."""
    p, cfg, h = plan.problem, plan.config, heuristics
    if plan.path == "per channel":
        return "the running statistics, one program per block of channels"
    if plan.path == "elementwise":
        given = {FROM_RUNNING: "the running statistics are given"}.get(
            plan.source, "the per-plane values are given")
        return (f"{given if p.op != h.STATS_BACKWARD else 'dx of given statistics'}: x read "
                f"once, {plan.chunks} chunk(s) per plane")
    if plan.path == "cluster":
        return (f"{p.hw} elements > MAX_SINGLE_TILE = {h.MAX_SINGLE_TILE}: held in a "
                f"{cfg.num_ctas}-CTA cluster (at most MAX_CLUSTER_CTAS = {h.MAX_CLUSTER_CTAS})")
    if plan.path == "single tile":
        return (f"{cfg.BLOCK_R} plane(s) of {p.hw} elements in one tile of {cfg.BLOCK_R} x "
                f"{cfg.BLOCK_HW} (at most MAX_SINGLE_TILE = {h.MAX_SINGLE_TILE})")
    rows = plan.passes[-1].grid[0] if p.op != h.BACKWARD else plan.passes[0].grid[0]
    target = h.PROGRAMS_PER_SM * plan.gpu.sms
    long = f"{p.hw} elements > one tile of {cfg.BLOCK_R} x {cfg.BLOCK_HW}, streamed"
    if plan.path == "split":
        stats = [s for s in plan.passes if s.kernel == "_fwd_split_stats"]
        tile = stats[0].options["TILE_HW"] if stats else 0
        return (f"{long}; {rows} row programs < PROGRAMS_PER_SM x SMs = {target}: "
                f"{plan.chunks} chunks per plane (at least {cfg.min_chunk_len} elements each)"
                + (f"; the statistics pass: {stats[0].grid[1]} chunks, one {cfg.BLOCK_R} x "
                   f"{tile} tile each" if tile else ""))
    return f"{long} twice; {rows} row programs, no split (PROGRAMS_PER_SM x SMs = {target})"


def _layout_name(x) -> str:
    if x.is_contiguous():
        return "contiguous"
    if x.dim() in (4, 5) and x.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d):
        return "channels_last" if x.dim() == 4 else "channels_last_3d"
    return "strided"


def minimum_bytes(plan: heuristics.Plan, param: int) -> int:
    """The least a direction can move (module docstring); ``param``: a parameter's itemsize (0:
    none). As perf/model.py's norm_bytes (a test ties the two)."""
    p = plan.problem
    tensor = p.n * p.c * p.hw * p.dtype.itemsize
    stats = NUM_STATS * p.n * p.c * p.acc.itemsize
    if p.op == heuristics.FORWARD:
        return 2 * tensor + 2 * p.c * param + stats
    return 3 * tensor + 3 * p.c * param + stats


def pass_bytes(plan: heuristics.Plan, weight: int, bias: int, running: int | None = None,
               dmean: bool = True, dstd: bool = True) -> list:
    """[(kernel, bytes read, bytes written)] of each pass of ``plan``, as the kernels load and
    store them lane by lane. ``weight`` / ``bias``: the parameters' itemsizes (0: absent);
    ``running``: the running statistics' (the input's by default); ``dmean`` / ``dstd``: the
    statistics' gradients given to ``_stats_bwd``."""
    p = plan.problem
    s, a, planes = p.dtype.itemsize, p.acc.itemsize, p.n * p.c
    tensor = p.hw * s  # of one plane
    running = s if running is None else running
    out = []
    for step in plan.passes:
        o, chunks = step.options, step.grid[-1] if len(step.grid) > 1 else 1
        params = chunks * (weight + bias)  # every program of a plane reads its parameters
        dz_residual = tensor if p.residual and p.activation != ACT_NONE else 0
        if step.kernel == "_fwd_split_stats":  # the pivot, per chunk
            read, written = chunks * s + tensor, chunks * NUM_FWD_PARTIALS * a
        elif step.kernel in ("_fwd_combine", "_bwd_combine"):
            fields = NUM_FWD_PARTIALS if step.kernel == "_fwd_combine" else NUM_SUMS
            out.append((step.kernel, planes * fields * a * o["chunks"],
                        planes * (NUM_STATS if fields == NUM_FWD_PARTIALS else NUM_SUMS) * a))
            continue
        elif step.kernel == "_fwd":
            source, write_y = o["STATS_FROM"], p.write_y
            read = {FROM_TILE: s + tensor, FROM_LOOP: s + tensor * (1 + write_y),
                    FROM_PARTIALS: chunks * NUM_STATS * a + tensor * write_y,
                    FROM_RUNNING: chunks * 2 * running + tensor * write_y}[source]
            read += (params + tensor * p.residual) * write_y
            stored = p.op == heuristics.FORWARD and any(b.name == "Stats" for b in plan.buffers)
            written = tensor * write_y + NUM_STATS * a * (stored and source != FROM_PARTIALS)
        elif step.kernel in ("_bwd_split_sums", "_bwd"):
            sweeps = 2 if o.get("SUMS_FROM") == FROM_LOOP else 1
            read = chunks * NUM_STATS * a + params + sweeps * (2 * tensor + dz_residual)
            if step.kernel == "_bwd_split_sums":
                written = chunks * NUM_SUMS * a
            else:
                given = o["SUMS_FROM"] == FROM_PARTIALS
                read += chunks * NUM_SUMS * a * given
                written = tensor * (1 + p.residual) + NUM_SUMS * a * (not given)
        elif step.kernel == "_stats_bwd":
            read = chunks * (NUM_STATS + dmean + dstd) * a + tensor
            written = tensor
        elif step.kernel == "_sum_partials_over_n":
            reduced = [size for size, on in ((weight, p.reduce_dw), (bias, p.reduce_db)) if on]
            out.append((step.kernel, planes * a * len(reduced), p.c * sum(reduced)))
            continue
        elif step.kernel == "_update_running_stats":
            out.append((step.kernel, planes * NUM_STATS * a + 2 * p.c * running,
                        2 * p.c * running))
            continue
        else:
            raise ValueError(f"no byte count for {step.kernel}")
        out.append((step.kernel, planes * read, planes * written))
    return out
