"""Host side of the kernels: tensors as kernel views, and the execution of launch plans.

A call's plan (heuristics.plan: every pass, its grid, tiles and options, and the buffers) is
computed once per layout and cached (``layout``): what a call derives from its tensors' shape,
strides, dtype and GPU, and its flags; a training loop sees the same few, and the host path
stays short. ``execute`` then allocates the plan's buffers and launches its passes, giving each
kernel the host's values by argument name: each tensor as a view that carries its own strides
(``planes_view``, ``param_view``, ``running_view``; the kernel side is described in
``kernels/common.py``), and the scalars.

Every kernel is called with keyword arguments through ``run``, which also counts the launch in
``LAUNCHES`` (per kernel name): tests use it to prove that the Triton kernels, not an eager
fallback, produced a result. Nothing here synchronizes with the device or branches on device
values, so every call can be captured in a CUDA graph.
"""

import collections
import contextlib
import functools
import math
import struct
from dataclasses import dataclass

import torch

from . import device, heuristics
from .kernels import (  # noqa: F401  (launched by the name the plans give)
    _bwd, _bwd_combine, _bwd_split_sums, _fwd, _fwd_combine, _fwd_split_stats, _stats_bwd,
    _sum_partials_over_n, _update_running_stats,
)
from .kernels.common import INTERPRETED
from .kernels.constants import SUM_DZ, SUM_DZ_XHAT

LAUNCHES = collections.Counter()


def run(kernel, grid, **arguments):
    """``kernel[grid](**arguments)`` on the device of its tensors, counted in ``LAUNCHES``."""
    if INTERPRETED:
        arguments = {name: _plain(v) for name, v in arguments.items()}
    kernel[grid](**arguments)
    LAUNCHES[kernel.fn.__name__] += 1


def _plain(v):
    """Tensor subclasses as plain tensors on the same memory: Triton's interpreter copies its
    arguments with methods a subclass may override (MONAI's MetaTensor.new_empty takes other
    arguments). A GPU launch reads only data_ptr(), which subclasses keep."""
    if isinstance(v, tuple):
        return tuple(_plain(e) for e in v)
    if isinstance(v, torch.Tensor) and type(v) is not torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return v.as_subclass(torch.Tensor)
    return v


@functools.lru_cache(maxsize=64)  # eps, momentum and slopes: a few values per model
def hi_lo(v: float):
    """(hi, lo) float32-representable with hi + lo == v to ~48 bits: float64 scalars for Triton,
    whose float arguments are float32."""
    v = float(v)
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return v, 0.0
    return hi, (v - hi if math.isfinite(hi) else 0.0)


def new_output(like: torch.Tensor) -> torch.Tensor:
    """Output buffer shaped and laid out like ``like`` (tests patch this to poison outputs)."""
    return torch.empty_like(like)


def new_buffer(like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Scratch buffer on ``like``'s device (tests patch this to poison it)."""
    return like.new_empty(shape, dtype=dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------- tensors as views

@dataclass(frozen=True)
class PlaneLayout:
    """A (N, C, *spatial) tensor seen as groups of planes: element (g, r, s) at
    g * group_stride + r * row_stride + s * spatial_stride, with groups * rows_per_group == N * C
    and row = g * rows_per_group + r = n * C + c."""

    groups: int
    rows_per_group: int
    hw: int
    group_stride: int
    row_stride: int
    spatial_stride: int


def _spatial_stride(t: torch.Tensor):
    """Stride of the flattened spatial dims, or None if they cannot be flattened in place."""
    shape, strides = t.shape, t.stride()
    if torch.compiler.is_compiling():  # dynamo traces through the cache (and warns about it)
        return _flat_stride(shape, strides)
    try:
        return _cached_flat_stride(shape, strides)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes) are not hashable
        return _flat_stride(shape, strides)


def _flat_stride(shape, strides):
    stride = None
    expected = None
    for size, s in reversed(list(zip(shape[2:], strides[2:]))):
        if size == 1:
            continue
        if stride is None:
            stride, expected = s, s * size
        elif s != expected:
            return None
        else:
            expected = s * size
    return 1 if stride is None else stride


_cached_flat_stride = functools.lru_cache(maxsize=1024)(_flat_stride)


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its spatial dims flatten to one stride, else a contiguous copy."""
    return t if _spatial_stride(t) is not None else t.contiguous()


def can_fold(t: torch.Tensor) -> bool:
    """True when the batch dim folds into the channels: plane (n, c) at row n * C + c, one
    stride."""
    n, c = t.shape[0], t.shape[1]
    return c == 1 or n == 1 or t.stride(0) == c * t.stride(1)


def planes(t: torch.Tensor, fold: bool) -> PlaneLayout:
    """``t`` as planes; ``fold`` (see can_fold) must be the same for tensors read side by side."""
    n, c = t.shape[0], t.shape[1]
    hw = math.prod(t.shape[2:])
    spatial = _spatial_stride(t)
    if not fold:
        return PlaneLayout(n, c, hw, t.stride(0), t.stride(1), spatial)
    if c == 1:  # rows are the batch entries
        return PlaneLayout(1, n, hw, 0, t.stride(0), spatial)
    return PlaneLayout(1, n * c, hw, 0, t.stride(1), spatial)


def planes_view(t: torch.Tensor, fold: bool):
    """(t, group stride, row stride, spatial stride): how a kernel reads or writes ``t``."""
    p = planes(t, fold)
    return t, p.group_stride, p.row_stride, p.spatial_stride


def param_view(p, n_batch: int):
    """(p, n stride, c stride) of a per-channel (C,) or per-sample (N, C) / (1, C) tensor."""
    if p is None:
        return None
    if p.dim() == 1:
        return p, 0, p.stride(0)
    return p, (p.stride(0) if p.shape[0] == n_batch and n_batch > 1 else 0), p.stride(1)


def running_view(running_mean, running_var):
    """(running_mean, its stride, running_var, its stride)."""
    return running_mean, running_mean.stride(0), running_var, running_var.stride(0)


@dataclass(frozen=True)
class Layout:
    """How a call reads tensors of one shape side by side: ``fold`` (see can_fold), the planes
    of the first, each tensor's (group, row, spatial) strides in the order given to ``layout``
    (None for an absent one; its kernel view: ``(t, *strides[i])``, as planes_view), and the
    call's plan."""

    fold: bool
    planes: PlaneLayout
    strides: tuple
    plan: heuristics.Plan
    # the plan as execute walks it: (name, shape, dtype) of each buffer it allocates, and
    # (kernel, grid, args, options as a dict) of each pass
    scratch: tuple
    steps: tuple


def layout(op: str, flags: tuple, *tensors, gpu=None, clusters=None) -> Layout:
    """The Layout of a call of ``op`` on same-shaped tensors (each laid out as kernel_layout
    leaves it, or None), ``flags`` the rest of its heuristics.Problem (use_input_stats,
    store_stats, write_y, residual, activation, reduce_dw, reduce_db), cached per shape,
    strides, dtype, flags and GPU: every call of a training loop sees the same few. ``gpu`` /
    ``clusters``: planned for another GPU, clusters on or off (``explain``); by default the
    tensors' GPU and what a launch there decides."""
    t = tensors[0]
    # What else the plan reads is part of the key: the GPU (emulated ones are chosen by an
    # environment variable), whether clusters are on, and the heuristics' test hooks.
    gpu = device.describe(t.device) if gpu is None else gpu
    if clusters is None:
        clusters = device.cluster_launch(gpu, real=t.is_cuda)
    strides = [None if u is None else u.stride() for u in tensors]
    return cached_layout(op, flags, t.shape, t.dtype, gpu, clusters, heuristics.HOOKS.tile_limit,
                         heuristics.HOOKS.chunk_len, *strides)


@functools.lru_cache(maxsize=1024)
def cached_layout(op, flags, shape, dtype, gpu, clusters, tile_limit, chunk, *strides) -> Layout:
    like = [None if s is None else torch.empty_strided(shape, s, dtype=dtype, device="meta")
            for s in strides]
    fold = all(can_fold(u) for u in like if u is not None)
    views = [None if u is None else planes(u, fold) for u in like]
    p = views[0]
    problem = heuristics.Problem(op, shape[0], shape[1], p.hw, p.groups, p.rows_per_group,
                                 p.row_stride == 1 and p.hw > 1, dtype, *flags)
    plan = heuristics.plan(problem, gpu, clusters)
    return Layout(fold, p, tuple(None if v is None else (v.group_stride, v.row_stride,
                                                         v.spatial_stride) for v in views),
                  plan, tuple((b.name, b.shape, b.dtype) for b in plan.buffers if b.like is None),
                  tuple((s.kernel, s.grid, s.args, dict(s.options)) for s in plan.passes))


def _device_guard(t: torch.Tensor):
    return torch.cuda.device_of(t) if t.is_cuda else contextlib.nullcontext()


def execute(lay: Layout, like: torch.Tensor, values: dict) -> dict:
    """Runs the passes of ``lay.plan``: ``values`` holds what the host gives by argument name
    (views, parameters, scalars, the outputs already allocated); the plan's other buffers are
    allocated on ``like``'s device into it."""
    for name, shape, dtype in lay.scratch:
        values[name] = new_buffer(like, shape, dtype)
    with _device_guard(like):
        _run_steps(lay.steps, values)
    return values


def _run_steps(steps, values):
    kernels = globals()  # looked up at each launch: perf/aot_worker.py swaps in recorders
    get = values.get
    for kernel, grid, args, options in steps:
        arguments = {a: get(v) for a, v in args}
        arguments.update(options)
        run(kernels[kernel], grid, **arguments)


FORWARD_PLANES = ("x", "y", "r")  # the planes operands of the forward's passes, as given to layout
BACKWARD_PLANES = ("x", "dy", "dx", "r", "dr")  # and of the backward's


def host_values(lay: Layout, names: tuple, tensors: tuple, weight, bias, eps: float,
                negative_slope: float) -> dict:
    """What the passes over planes take from the host: the planes views of ``tensors`` (as
    given to ``layout``, None for an absent one) by ``names``, the parameters and scalars."""
    n = tensors[0].shape[0]
    values = {"w": param_view(weight, n), "b": param_view(bias, n), "eps": hi_lo(eps),
              "slope": hi_lo(negative_slope), "EXACT": eps == 0.0}
    for name, t, strides in zip(names, tensors, lay.strides):
        values[name] = None if t is None else (t, *strides)
    return values


# ------------------------------------------------------------------------------------ the passes

def forward(x, weight, bias, running_mean, running_var, use_input_stats: bool, eps: float,
            activation: int, negative_slope: float, store_stats: bool, write_y: bool = True,
            residual=None):
    """y and the (NUM_STATS, N, C) statistics (an empty tensor unless ``store_stats``).
    ``write_y=False`` computes the statistics only (y is then an empty placeholder).
    ``residual``, x's shape and dtype, is added before the activation."""
    x = kernel_layout(x)
    y = new_output(x) if write_y else None
    residual = None if residual is None else kernel_layout(residual)
    lay = layout(heuristics.FORWARD, (use_input_stats, store_stats, write_y, residual is not None,
                                      activation), x, y, residual)
    values = host_values(lay, FORWARD_PLANES, (x, y, residual), weight, bias, eps, negative_slope)
    values["running"] = None if use_input_stats else running_view(running_mean, running_var)
    stats = execute(lay, x, values).get("Stats")
    if y is None:
        y = x.new_empty((0,))
    return y, stats if store_stats else x.new_empty((0,), dtype=acc_dtype(x.dtype))


def update_running_stats(stats, running_mean, running_var, n: int, c: int, hw: int,
                         momentum: float):
    p = _update_plan(n, c, hw, stats.dtype)
    step = p.passes[0]
    with _device_guard(stats):
        run(_update_running_stats, step.grid, Stats=stats,
            running=running_view(running_mean, running_var), momentum=hi_lo(momentum),
            **step.options)


@functools.lru_cache(maxsize=256)
def _update_plan(n, c, hw, dtype):
    return heuristics.plan(heuristics.Problem(heuristics.UPDATE, n, c, hw, dtype=dtype))


def backward(dy, x, weight, bias, stats, use_input_stats: bool, eps: float, activation: int,
             negative_slope: float, need_dw: bool, need_db: bool, residual=None,
             plane_sums=None, count: int = 0):
    """(dx, dweight, dbias, dresidual); dweight / dbias have the parameter's shape, or are empty
    when not needed. ``residual``: the one the forward added before its activation, given when
    its gradient is needed: dresidual = dy * act'(z), which the pass forms anyway (else
    empty). ``plane_sums``: the per-plane sums given, of planes of ``count`` elements of which
    ``x`` holds a part (parts.backward_from_sums)."""
    op = heuristics.BACKWARD if plane_sums is None else heuristics.BACKWARD_FROM_SUMS
    x = kernel_layout(x)
    dy = kernel_layout(dy)
    dx = new_output(x)
    n = x.shape[0]
    residual = None if residual is None else kernel_layout(residual)
    dres = None if residual is None else new_output(residual)
    reduce_dw = need_dw and weight is not None and _per_channel(weight, n)
    reduce_db = need_db and bias is not None and _per_channel(bias, n)
    lay = layout(op, (use_input_stats, False, True, residual is not None, activation, reduce_dw,
                      reduce_db), x, dy, dx, residual, dres)
    values = host_values(lay, BACKWARD_PLANES, (x, dy, dx, residual, dres), weight, bias, eps,
                     negative_slope)
    values.update(Stats=stats,
                  DW=new_buffer(weight, weight.shape, weight.dtype) if reduce_dw else None,
                  DB=new_buffer(bias, bias.shape, bias.dtype) if reduce_db else None)
    if plane_sums is not None:  # given: _bwd averages them over its own planes' length
        hw = lay.planes.hw
        values.update(PlaneSums=plane_sums, KernelSums=plane_sums if count == hw or not hw
                      else plane_sums * (hw / count))
    plane_sums = execute(lay, x, values)["PlaneSums"]
    dw = _param_grad(values["DW"], plane_sums, SUM_DZ_XHAT, weight, need_dw)
    db = _param_grad(values["DB"], plane_sums, SUM_DZ, bias, need_db)
    return dx, dw, db, x.new_empty((0,)) if dres is None else dres


def stats_backward(dmean, dstd, x, stats, eps: float):
    """dx of per-plane (mean, std) outputs (AdaIN's style statistics): one elementwise pass."""
    x = kernel_layout(x)
    dx = new_output(x)
    n = x.shape[0]
    lay = layout(heuristics.STATS_BACKWARD, (), x, dx)
    execute(lay, x, dict(x=(x, *lay.strides[0]), dx=(dx, *lay.strides[1]),
                          dmean=param_view(dmean, n), dstd=param_view(dstd, n), Stats=stats,
                          eps=hi_lo(eps)))
    return dx


def _per_channel(p, n: int) -> bool:
    return p.dim() == 1 or p.shape[0] != n or n == 1


def _param_grad(reduced, plane_sums, field: int, p, needed: bool):
    """The gradient of a parameter: ``reduced`` over n for a per-channel one, the per-plane
    sums (``plane_sums[field]``) themselves for per-sample (N, C) parameters, or empty when not
    needed."""
    if not needed or p is None:
        return plane_sums.new_empty((0,))
    if reduced is not None:
        return reduced
    # one (N, C) copy: outputs never alias
    return plane_sums[field].view(p.shape).to(p.dtype, copy=True)
