"""Host side of the kernels: tensors as kernel views, buffers, and the launches.

Every kernel is called with keyword arguments through ``run``, which also counts the launch in
``LAUNCHES`` (per kernel name): tests use it to prove that the Triton kernels, not an eager
fallback, produced a result. Each tensor reaches a kernel as a view that carries its own strides
(``planes_view``, ``param_view``, ``running_view``; the kernel side is described in
``kernels/common.py``). What a pass derives from its tensors' shape, strides, dtype and device
(the planes, their strides, the launch configuration) is computed once per such layout and
cached (``layout``): a training loop sees the same few, and the host path stays short.

Nothing here synchronizes with the device or branches on device values, so every call can be
captured in a CUDA graph.
"""

import collections
import contextlib
import functools
import math
import struct
from dataclasses import dataclass

import torch

from . import device, heuristics
from .kernels import (
    _bwd, _bwd_combine, _bwd_split_sums, _fwd, _fwd_combine, _fwd_split_stats, _stats_bwd,
    _sum_partials_over_n, _update_running_stats,
)
from .kernels.common import INTERPRETED
from .kernels.constants import (
    FROM_PARTIALS, FROM_PLANE, FROM_RUNNING, FROM_TILE, NUM_FWD_PARTIALS, NUM_STATS, NUM_SUMS,
    SUM_DZ, SUM_DZ_XHAT,
)

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


def split_float(v: float):
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
class Planes:
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


def planes(t: torch.Tensor, fold: bool) -> Planes:
    """``t`` as planes; ``fold`` (see can_fold) must be the same for tensors read side by side."""
    n, c = t.shape[0], t.shape[1]
    hw = math.prod(t.shape[2:])
    spatial = _spatial_stride(t)
    if not fold:
        return Planes(n, c, hw, t.stride(0), t.stride(1), spatial)
    if c == 1:  # rows are the batch entries
        return Planes(1, n, hw, 0, t.stride(0), spatial)
    return Planes(1, n * c, hw, 0, t.stride(1), spatial)


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


def geometry(t: torch.Tensor, p: Planes):
    """(N * C planes, C, HW, rows per group), the kernels' plane geometry."""
    return t.shape[0] * t.shape[1], t.shape[1], p.hw, p.rows_per_group


@dataclass(frozen=True)
class Layout:
    """How a pass reads tensors of one shape side by side: ``fold`` (see can_fold), the planes
    of the first, its launch configuration, the plane geometry, and each tensor's (group, row,
    spatial) strides in the order given to ``layout`` (its kernel view: ``(t, *strides[i])``,
    as planes_view)."""

    fold: bool
    planes: Planes
    how: "Launch"
    geometry: tuple
    strides: tuple
    tiles: dict  # how.tiles()


def layout(*tensors: torch.Tensor) -> Layout:
    """The Layout of same-shaped tensors (each laid out as kernel_layout leaves it), cached per
    shape, strides, dtype and device: every call of a training loop sees the same few."""
    t = tensors[0]
    # What else plan() reads is part of the key: the GPU (emulated ones are chosen by an
    # environment variable), whether clusters are on, and the heuristics' test hooks.
    gpu = device.describe(t)
    return _layout(t.shape, t.dtype, t.device, gpu, device.cluster_launch(gpu, real=t.is_cuda),
                   heuristics.HOOKS.tile_limit, heuristics.HOOKS.chunk,
                   *[u.stride() for u in tensors])


@functools.lru_cache(maxsize=1024)
def _layout(shape, dtype, where, gpu, clusters, tile_limit, chunk, *strides) -> Layout:
    like = [torch.empty_strided(shape, s, dtype=dtype, device="meta") for s in strides]
    fold = all(can_fold(t) for t in like)
    views = [planes(t, fold) for t in like]
    how = plan(views[0], torch.empty(0, dtype=dtype, device=where))
    return Layout(fold, views[0], how, geometry(like[0], views[0]),
                  tuple((p.group_stride, p.row_stride, p.spatial_stride) for p in views),
                  how.tiles())


# ------------------------------------------------------------------------- launch configuration

@dataclass(frozen=True)
class Launch:
    """How a pass over planes runs: tile configuration, grid (row programs, chunks), where the
    pass takes its per-plane reductions (a FROM_* constant), and the device it was planned for.

    The grid counts programs; a program of ``config.num_ctas`` > 1 CTAs runs as one thread-block
    cluster (Triton launches grid[0] x num_ctas CTAs and numbers the programs by cluster)."""

    config: heuristics.Config
    grid: tuple
    source: int
    gpu: device.Device

    @property
    def chunks(self) -> int:
        return self.grid[1]

    def tiles(self):
        """The tile constexprs and launch options every pass over planes takes."""
        tiles = dict(BLOCK_R=self.config.BLOCK_R, BLOCK_HW=self.config.BLOCK_HW,
                     num_warps=self.config.num_warps)
        if self.config.num_ctas > 1:
            tiles["num_ctas"] = self.config.num_ctas
        return tiles


def plan(p: Planes, t: torch.Tensor) -> Launch:
    gpu = device.describe(t)
    config = heuristics.plane_config(p.hw, p.rows_per_group, groups=p.groups,
                                     rows_contiguous=(p.row_stride == 1 and p.hw > 1),
                                     itemsize=t.element_size(), gpu=gpu,
                                     clusters=device.cluster_launch(gpu, real=t.is_cuda))
    row_programs = p.groups * heuristics.cdiv(p.rows_per_group, config.BLOCK_R)
    chunks = heuristics.split_chunks(p.hw, row_programs, config, gpu.sms)
    if chunks > 1:
        source = FROM_PARTIALS
    else:
        source = FROM_TILE if config.SINGLE_TILE else FROM_PLANE
    return Launch(config, (row_programs, chunks), source, gpu)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device_of(t) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------------------------ the passes

def forward(x, weight, bias, running_mean, running_var, use_input_stats: bool, eps: float,
            activation: int, negative_slope: float, store_stats: bool, write_y: bool = True,
            residual=None):
    """y and the (NUM_STATS, N, C) statistics (an empty tensor unless ``store_stats``).
    ``write_y=False`` computes the statistics only (y is then an empty placeholder).
    ``residual``, x's shape and dtype, is added before the activation."""
    x = kernel_layout(x)
    n, c = x.shape[0], x.shape[1]
    acc = acc_dtype(x.dtype)
    y = new_output(x) if write_y else None
    residual = None if residual is None else kernel_layout(residual)
    lay = layout(x) if y is None else layout(x, y, *_present(residual))
    how = lay.how
    x_view = (x, *lay.strides[0])
    source = how.source if use_input_stats else FROM_RUNNING
    # split planes combine their statistics through Stats, kept or not
    stats = (new_buffer(x, (NUM_STATS, n, c), acc)  # planes n * C + c, as the kernels index
             if store_stats or source == FROM_PARTIALS else None)
    with _device_guard(x):
        if source == FROM_PARTIALS:
            partials = new_buffer(x, (NUM_FWD_PARTIALS, n * c, how.chunks), acc)
            one_tile, warps = heuristics.statistics_pass(lay.planes.hw, how, x.element_size())
            run(_fwd_split_stats, how.grid, x=x_view, Partials=partials, geometry=lay.geometry,
                ONE_TILE=one_tile, **dict(lay.tiles, num_warps=warps))
            _combine(_fwd_combine, how.gpu, partials, Stats=stats, HW=lay.planes.hw,
                     BLOCK_HW=how.config.BLOCK_HW)
        if y is not None or source != FROM_PARTIALS:  # else the statistics are complete
            run(_fwd, how.grid,
                x=x_view, y=None if y is None else (y, *lay.strides[1]),
                r=None if residual is None else (residual, *lay.strides[2]),
                w=param_view(weight, n), b=param_view(bias, n),
                running=None if use_input_stats else running_view(running_mean, running_var),
                Stats=stats, geometry=lay.geometry, eps=split_float(eps),
                slope=split_float(negative_slope), STATS_FROM=source, ACTIVATION=activation,
                EXACT=eps == 0.0, **lay.tiles)
    if y is None:
        y = x.new_empty((0,))
    return y, stats if store_stats else x.new_empty((0,), dtype=acc)


def _combine(kernel, gpu, partials, **arguments):
    """A combine pass: the (rows, N * C, chunks) partials of split planes reduced over the chunks
    into a (rows, N * C) per-plane buffer, BLOCK_R planes per program."""
    num_planes, chunks = partials.shape[1], partials.shape[2]
    block_r, block_chunks, warps = heuristics.combine_config(num_planes, chunks, gpu.warp_size)
    run(kernel, (heuristics.cdiv(num_planes, block_r),), Partials=partials, num_planes=num_planes,
        chunks=chunks, BLOCK_R=block_r, BLOCK_CHUNKS=block_chunks, num_warps=warps, **arguments)


def update_running_stats(stats, running_mean, running_var, n: int, c: int, hw: int,
                         momentum: float):
    block = heuristics.reduce_block(c)
    with _device_guard(stats):
        run(_update_running_stats, (heuristics.cdiv(c, block),), Stats=stats,
            running=running_view(running_mean, running_var), N=n, C=c, HW=hw,
            momentum=split_float(momentum), BLOCK_C=block)


def backward(dy, x, weight, bias, stats, use_input_stats: bool, eps: float, activation: int,
             negative_slope: float, need_dw: bool, need_db: bool, residual=None):
    """(dx, dweight, dbias, dresidual); dweight / dbias have the parameter's shape, or are empty
    when not needed. ``residual``: the one the forward added before its activation, given when
    its gradient is needed: dresidual = dy * act'(z), which the pass forms anyway (else
    empty)."""
    x = kernel_layout(x)
    dy = kernel_layout(dy)
    dx = new_output(x)
    n, c = x.shape[0], x.shape[1]
    plane_sums = new_buffer(x, (NUM_SUMS, n * c), stats.dtype)
    residual = None if residual is None else kernel_layout(residual)
    dres = None if residual is None else new_output(residual)
    lay = layout(x, dy, dx, *_present(residual, dres))
    how = lay.how
    inputs = _backward_inputs(lay, dy, x, weight, bias, stats, use_input_stats, eps, activation,
                              negative_slope,
                              r=None if residual is None else (residual, *lay.strides[3]))
    with _device_guard(x):
        if how.source == FROM_PARTIALS:
            partials = new_buffer(x, (NUM_SUMS, n * c, how.chunks), stats.dtype)
            run(_bwd_split_sums, how.grid, Partials=partials, **inputs)
            _combine(_bwd_combine, how.gpu, partials, PlaneSums=plane_sums)
        run(_bwd, how.grid, dx=(dx, *lay.strides[2]), PlaneSums=plane_sums,
            dr=None if dres is None else (dres, *lay.strides[4]), SUMS_FROM=how.source,
            **inputs)
        dw = _param_grad(plane_sums, SUM_DZ_XHAT, weight, need_dw, n)
        db = _param_grad(plane_sums, SUM_DZ, bias, need_db, n)
        _reduce_over_n(plane_sums, dw, db, weight, bias, n, c)
    return dx, dw, db, x.new_empty((0,)) if dres is None else dres


def _present(*tensors):
    """The tensors that are not None (optional operands of a layout)."""
    return [t for t in tensors if t is not None]


def _backward_inputs(lay, dy, x, weight, bias, stats, use_input_stats, eps, activation,
                     negative_slope, r=None):
    """The arguments every backward pass over planes takes (``lay``: layout(x, dy, ...); ``r``:
    the residual's view, or None)."""
    n = x.shape[0]
    return dict(x=(x, *lay.strides[0]), dy=(dy, *lay.strides[1]), r=r, w=param_view(weight, n),
                b=param_view(bias, n), Stats=stats, geometry=lay.geometry, eps=split_float(eps),
                slope=split_float(negative_slope), USE_INPUT_STATS=use_input_stats,
                ACTIVATION=activation, **lay.tiles)


def stats_backward(dmean, dstd, x, stats, eps: float):
    """dx of per-plane (mean, std) outputs (AdaIN's style statistics): one elementwise pass."""
    x = kernel_layout(x)
    dx = new_output(x)
    n = x.shape[0]
    lay = layout(x, dx)
    how = lay.how  # elementwise: any split is just more programs, no partials
    with _device_guard(x):
        run(_stats_bwd, how.grid, x=(x, *lay.strides[0]), dx=(dx, *lay.strides[1]),
            dmean=param_view(dmean, n), dstd=param_view(dstd, n), Stats=stats,
            geometry=lay.geometry, eps=split_float(eps), SPLIT=how.chunks > 1, **lay.tiles)
    return dx


def _per_channel(p, n: int) -> bool:
    return p.dim() == 1 or p.shape[0] != n or n == 1


def _param_grad(plane_sums, row: int, p, needed: bool, n: int):
    """The gradient of a parameter: a buffer for the reduction over n of a per-channel one, the
    per-plane sums (``plane_sums[row]``) themselves for per-sample (N, C) parameters, or empty
    when not needed."""
    if not needed or p is None:
        return plane_sums.new_empty((0,))
    if _per_channel(p, n):
        return new_buffer(p, p.shape, p.dtype)
    # one (N, C) copy: outputs never alias
    return plane_sums[row].view(p.shape).to(p.dtype, copy=True)


def _reduce_over_n(plane_sums, dw, db, weight, bias, n: int, c: int):
    dw = dw if dw.numel() and _per_channel(weight, n) else None
    db = db if db.numel() and _per_channel(bias, n) else None
    if dw is None and db is None:
        return
    block = heuristics.reduce_block(c)
    run(_sum_partials_over_n, (heuristics.cdiv(c, block),), PlaneSums=plane_sums, DW=dw, DB=db,
        N=n, C=c, BLOCK_C=block)


# --------------------------------------- passes for planes held in parts (see distributed.py)

def normalize(x, weight, bias, stats, eps: float, activation: int, negative_slope: float,
              residual=None):
    """y from given statistics: the forward's normalize pass alone, ``_fwd`` reading ``stats``
    (NUM_STATS rows of N * C planes, as the forward writes them), e.g. statistics of whole planes
    of which ``x`` holds a part."""
    x = kernel_layout(x)
    n = x.shape[0]
    y = new_output(x)
    if x.numel() == 0:  # a part with no element of its planes
        return y
    residual = None if residual is None else kernel_layout(residual)
    lay = layout(x, y, *_present(residual))
    with _device_guard(x):
        run(_fwd, lay.how.grid, x=(x, *lay.strides[0]), y=(y, *lay.strides[1]),
            r=None if residual is None else (residual, *lay.strides[2]),
            w=param_view(weight, n), b=param_view(bias, n), running=None, Stats=stats,
            geometry=lay.geometry, eps=split_float(eps), slope=split_float(negative_slope),
            STATS_FROM=FROM_PARTIALS, ACTIVATION=activation, EXACT=eps == 0.0, **lay.tiles)
    return y


def backward_sums(dy, x, weight, bias, stats, use_input_stats: bool, eps: float, activation: int,
                  negative_slope: float, residual=None):
    """The backward's per-plane sums alone, (NUM_SUMS, N * C): SUM_DZ_XHAT and SUM_DZ over the
    elements of each plane that ``x`` holds (``_bwd_split_sums``, then ``_bwd_combine`` when the
    planes are split across programs)."""
    x = kernel_layout(x)
    dy = kernel_layout(dy)
    planes_n = x.shape[0] * x.shape[1]
    if x.numel() == 0:  # a part with no element of its planes
        return stats.new_zeros((NUM_SUMS, planes_n))
    residual = None if residual is None else kernel_layout(residual)
    lay = layout(x, dy, *_present(residual))
    how = lay.how
    partials = new_buffer(x, (NUM_SUMS, planes_n, how.chunks), stats.dtype)
    with _device_guard(x):
        run(_bwd_split_sums, how.grid, Partials=partials,
            **_backward_inputs(lay, dy, x, weight, bias, stats, use_input_stats, eps, activation,
                               negative_slope,
                               r=None if residual is None else (residual, *lay.strides[2])))
        if how.chunks == 1:
            return partials.view(NUM_SUMS, planes_n)
        plane_sums = new_buffer(x, (NUM_SUMS, planes_n), stats.dtype)
        _combine(_bwd_combine, how.gpu, partials, PlaneSums=plane_sums)
    return plane_sums


def backward_from_sums(dy, x, weight, bias, stats, plane_sums, count: int, use_input_stats: bool,
                       eps: float, activation: int, negative_slope: float, need_dw: bool,
                       need_db: bool, residual=None):
    """(dx, dweight, dbias, dresidual) as ``backward`` returns them, from given per-plane sums
    of planes of ``count`` elements, of which ``x`` holds a part: ``_bwd`` reading
    ``plane_sums``."""
    x = kernel_layout(x)
    dy = kernel_layout(dy)
    dx = new_output(x)
    n, c = x.shape[0], x.shape[1]
    residual = None if residual is None else kernel_layout(residual)
    dres = None if residual is None else new_output(residual)
    with _device_guard(x):
        if x.numel():  # else a part with no element of its planes: only dweight, dbias
            lay = layout(x, dy, dx, *_present(residual, dres))
            # _bwd averages the sums over its own planes' length: rescaled to ``count``
            hw = lay.planes.hw
            kernel_sums = plane_sums if count == hw else plane_sums * (hw / count)
            run(_bwd, lay.how.grid, dx=(dx, *lay.strides[2]), PlaneSums=kernel_sums,
                dr=None if dres is None else (dres, *lay.strides[4]), SUMS_FROM=FROM_PARTIALS,
                **_backward_inputs(lay, dy, x, weight, bias, stats, use_input_stats, eps,
                                   activation, negative_slope,
                                   r=None if residual is None else (residual, *lay.strides[3])))
        dw = _param_grad(plane_sums, SUM_DZ_XHAT, weight, need_dw, n)
        db = _param_grad(plane_sums, SUM_DZ, bias, need_db, n)
        _reduce_over_n(plane_sums, dw, db, weight, bias, n, c)
    return dx, dw, db, x.new_empty((0,)) if dres is None else dres
