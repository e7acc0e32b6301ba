"""Forward kernels: the split planes' statistics and combine passes, the normalize pass, the
running-stat update.

A forward is one ``_fwd`` launch, preceded by ``_fwd_split_stats`` and ``_fwd_combine`` when long
planes are split across programs to fill the GPU. Views and geometry are described in
``common.py``.
"""

import triton
import triton.language as tl

from .common import (
    FROM_PARTIALS, FROM_PLANE, FROM_RUNNING, FROM_TILE, INV_SCALE, MEAN, PIVOT, SCALE, SUM,
    SUM_SQ, VAR, _activate, _chunk_partials, _chunk_range, _div, _host_float, _inverse_scale,
    _load_param, _load_running, _load_stats, _partial, _plane_block, _plane_start,
    _program_channels, _program_planes, _row, _safe_shifted_sums, _std, _tile,
)


@triton.jit
def _write_y(y_planes, offs, tile_mask, delta, norm, affine, ACTIVATION: tl.constexpr):
    """y = act(x_hat * w + b) for one tile, x_hat = (delta * inv_scale - mean) / std with
    delta = x - pivot; ``norm`` is (inv_scale, mean, std), ``affine`` (w, b, negative slope)."""
    y_start, y_stride = y_planes
    inv_scale, mean, std = norm
    scale_w, shift_b, negative_slope = affine
    x_hat = _div(delta * inv_scale[:, None] - mean[:, None], std[:, None])
    out = _activate(x_hat * scale_w[:, None] + shift_b[:, None], negative_slope, ACTIVATION)
    tl.store(y_start[:, None] + offs[None, :] * y_stride, out.to(y_start.dtype.element_ty),
             mask=tile_mask)


@triton.jit
def _fwd_split_stats(
    x,  # planes view of the input
    Partials,  # (NUM_FWD_PARTIALS, N * C, chunks) ACC: SUM, SUM_SQ, SCALE of each chunk
    Stats,  # (NUM_STATS, N * C) ACC: the PIVOT row is written here, by each plane's chunk 0
    geometry,  # (N * C, C, HW, rows per group)
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_HW: tl.constexpr,  # tile width along a plane
):
    """First pass over a split plane (grid: row programs x chunks): the chunk's pivot-shifted
    sums, for ``_fwd_combine`` to combine."""
    ACC: tl.constexpr = tl.float64 if x[0].dtype.element_ty == tl.float64 else tl.float32
    num_planes, C, HW, _ = geometry
    group, row_in_group, mask, plane, n, c = _program_planes(geometry, BLOCK_R)
    chunk, chunks, start, end, first = _chunk_range(HW, mask, BLOCK_HW, BLOCK_R, True)
    x_start, x_stride = _plane_start(x, group, row_in_group)
    pivot = tl.load(x_start, mask=mask, other=0.0).to(ACC)  # the same pivot in every chunk
    sum_a, sum_sq, inv_scale = _safe_shifted_sums(x_start, x_stride, mask, start, end, pivot, ACC,
                                                  BLOCK_R, BLOCK_HW)
    tl.store(_partial(Partials, SUM, num_planes, plane, chunk, chunks), sum_a, mask=mask)
    tl.store(_partial(Partials, SUM_SQ, num_planes, plane, chunk, chunks), sum_sq, mask=mask)
    tl.store(_partial(Partials, SCALE, num_planes, plane, chunk, chunks), 1.0 / inv_scale,
             mask=mask)
    tl.store(_row(Stats, PIVOT, num_planes, plane), pivot, mask=first)


@triton.jit
def _fwd_combine(
    Partials,  # (NUM_FWD_PARTIALS, N * C, chunks) from _fwd_split_stats
    Stats,  # (NUM_STATS, N * C) ACC: INV_SCALE, MEAN and VAR are written here
    num_planes, HW, chunks,
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_CHUNKS: tl.constexpr,  # next power of two >= chunks
):
    """Each split plane's statistics from its chunks' partials, combined once in a fixed order
    (grid: planes / BLOCK_R): the normalize pass then reads 4 values per plane, not the partials
    of every chunk."""
    ACC: tl.constexpr = Stats.dtype.element_ty
    plane, mask = _plane_block(num_planes, BLOCK_R)
    sums = _chunk_partials(Partials, SUM, num_planes, plane, mask, chunks, BLOCK_CHUNKS)
    sums_sq = _chunk_partials(Partials, SUM_SQ, num_planes, plane, mask, chunks, BLOCK_CHUNKS)
    scales = _chunk_partials(Partials, SCALE, num_planes, plane, mask, chunks, BLOCK_CHUNKS)
    # Bring every chunk to the largest chunk scale s: a = d / s for all of them.
    scale = tl.where(mask, tl.max(scales, axis=1), 1.0)
    ratio = scales / scale[:, None]
    hw = tl.full([BLOCK_R], HW, ACC)
    mean = _div(tl.sum(sums * ratio, axis=1), hw)
    # clamp rounding below 0; a NaN variance stays NaN (as on the single-tile path)
    var = tl.maximum(_div(tl.sum(sums_sq * ratio * ratio, axis=1), hw) - mean * mean, 0.0,
                     propagate_nan=tl.PropagateNan.ALL)
    tl.store(_row(Stats, INV_SCALE, num_planes, plane), 1.0 / scale, mask=mask)
    tl.store(_row(Stats, MEAN, num_planes, plane), mean, mask=mask)
    tl.store(_row(Stats, VAR, num_planes, plane), var, mask=mask)


@triton.jit
def _fwd(
    x,  # planes view of the input
    y,  # planes view of the output; None: statistics only (AdaIN's style statistics)
    w,  # param view of the scale of plane (n, c) (n stride 0: per channel); None: 1
    b,  # param view of the shift; None: 0
    running,  # running view, read when STATS_FROM == FROM_RUNNING, else None
    Stats,  # (NUM_STATS, N * C) ACC: written by each plane's chunk-0 program, or None (not
            # kept); read with STATS_FROM == FROM_PARTIALS (written by _fwd_combine)
    geometry,  # (N * C, C, HW, rows per group)
    eps,  # (hi, lo) float32 pair
    slope,  # leaky_relu's negative slope, (hi, lo)
    STATS_FROM: tl.constexpr,  # FROM_TILE, FROM_PLANE, FROM_PARTIALS or FROM_RUNNING
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_HW: tl.constexpr,  # tile width along a plane (the whole plane with FROM_TILE)
):
    """Statistics, normalize, affine and activation of a chunk of BLOCK_R planes (grid: row
    programs x chunks; one chunk unless the planes are split).

    x_hat = ((x - pivot) * inv_scale - mean) / std, the statistics taken as STATS_FROM says."""
    ACC: tl.constexpr = tl.float64 if x[0].dtype.element_ty == tl.float64 else tl.float32
    num_planes, C, HW, _ = geometry
    group, row_in_group, mask, plane, n, c = _program_planes(geometry, BLOCK_R)
    _, _, start, end, first = _chunk_range(HW, mask, BLOCK_HW, BLOCK_R,
                                           STATS_FROM == FROM_PARTIALS)
    x_start, x_stride = _plane_start(x, group, row_in_group)
    hw = tl.full([BLOCK_R], HW, ACC)

    # ---- statistics ---------------------------------------------------------------------------
    if STATS_FROM == FROM_RUNNING:
        pivot, var = _load_running(running, c, mask, ACC)
        inv_scale = tl.full([BLOCK_R], 1.0, ACC)
        mean = tl.zeros([BLOCK_R], dtype=ACC)
    elif STATS_FROM == FROM_PARTIALS:
        pivot, inv_scale, mean, var = _load_stats(Stats, num_planes, plane, mask)
    else:
        pivot = tl.load(x_start, mask=mask, other=0.0).to(ACC)
    if STATS_FROM == FROM_TILE:
        offs, tile_mask = _tile(0, mask, HW, BLOCK_HW)
        xt = tl.load(x_start[:, None] + offs[None, :] * x_stride, mask=tile_mask, other=0.0)
        delta = tl.where(tile_mask, xt.to(ACC) - pivot[:, None], 0.0)
        inv_scale = _inverse_scale(tl.max(tl.abs(delta), axis=1), ACC)
        a = delta * inv_scale[:, None]
        mean = _div(tl.sum(a, axis=1), hw)  # correctly rounded: 2-element planes stay exact
        centered = tl.where(tile_mask, a - mean[:, None], 0.0)
        var = _div(tl.sum(centered * centered, axis=1), hw)  # exact two-pass, in registers
    elif STATS_FROM == FROM_PLANE:
        sum_a, sum_sq, inv_scale = _safe_shifted_sums(x_start, x_stride, mask, 0, HW, pivot, ACC,
                                                      BLOCK_R, BLOCK_HW)
        mean = _div(sum_a, hw)
        # clamp rounding below 0; a NaN variance stays NaN (as on the single-tile path)
        var = tl.maximum(_div(sum_sq, hw) - mean * mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
    std = _std(var, inv_scale, _host_float(eps, ACC))
    if STATS_FROM != FROM_PARTIALS:
        if Stats is not None:
            tl.store(_row(Stats, PIVOT, num_planes, plane), pivot, mask=first)
            tl.store(_row(Stats, INV_SCALE, num_planes, plane), inv_scale, mask=first)
            tl.store(_row(Stats, MEAN, num_planes, plane), mean, mask=first)
            tl.store(_row(Stats, VAR, num_planes, plane), var, mask=first)

    # ---- normalize, affine, activation --------------------------------------------------------
    if y is not None:
        y_planes = _plane_start(y, group, row_in_group)
        norm = (inv_scale, mean, std)
        affine = (_load_param(w, n, c, mask, 1.0, ACC, BLOCK_R),
                  _load_param(b, n, c, mask, 0.0, ACC, BLOCK_R), _host_float(slope, ACC))
        if STATS_FROM == FROM_TILE:  # x is still in registers
            _write_y(y_planes, offs, tile_mask, delta, norm, affine, ACTIVATION)
        else:
            for t in range(start, end, BLOCK_HW):
                offs, tile_mask = _tile(t, mask, end, BLOCK_HW)
                xt = tl.load(x_start[:, None] + offs[None, :] * x_stride, mask=tile_mask, other=0.0)
                _write_y(y_planes, offs, tile_mask, xt.to(ACC) - pivot[:, None], norm, affine,
                         ACTIVATION)


@triton.jit
def _update_running_stats(
    Stats,  # (NUM_STATS, N * C) statistics written by the forward
    running,  # running view, updated in place
    N, C, HW,
    momentum,  # (hi, lo) float32 pair
    BLOCK_C: tl.constexpr,  # channels per program
):
    """running = (1 - m) * running + m * mean over n of (mean_nc, unbiased var_nc), as torch."""
    ACC: tl.constexpr = Stats.dtype.element_ty
    c, mask, plane, num_planes = _program_channels(N, C, BLOCK_C)
    mean_sum = tl.zeros([BLOCK_C], dtype=ACC)
    var_sum = tl.zeros([BLOCK_C], dtype=ACC)
    for n in range(0, N):  # fixed order: deterministic
        pivot = tl.load(_row(Stats, PIVOT, num_planes, plane), mask=mask, other=0.0)
        inv_scale = tl.load(_row(Stats, INV_SCALE, num_planes, plane), mask=mask, other=1.0)
        mean = tl.load(_row(Stats, MEAN, num_planes, plane), mask=mask, other=0.0)
        var = tl.load(_row(Stats, VAR, num_planes, plane), mask=mask, other=0.0)
        mean_sum += pivot + mean / inv_scale
        var_sum += var / (inv_scale * inv_scale)
        plane += C
    m = _host_float(momentum, ACC)
    running_mean, running_var = _load_running(running, c, mask, ACC)
    running_mean = (1.0 - m) * running_mean + m * (mean_sum / N)
    running_var = (1.0 - m) * running_var + m * (var_sum * HW / (HW - 1) / N)  # unbiased, as torch
    mean_pointer, mean_stride, var_pointer, var_stride = running
    tl.store(mean_pointer + c * mean_stride, running_mean.to(mean_pointer.dtype.element_ty),
             mask=mask)
    tl.store(var_pointer + c * var_stride, running_var.to(var_pointer.dtype.element_ty), mask=mask)
