"""Forward kernels: statistics, normalize, affine and activation; the running-stat update.

Tensors are addressed as planes: element (group g, row r, spatial s) at
``g * s_g + r * s_r + s * s_s``; plane (n, c) is flat row ``g * rows_per_group + r = n * C + c``.
Contiguous NCHW folds the batch into one group (rows stride HW, spatial stride 1);
channels_last keeps a group per sample (rows stride 1, spatial stride C).
"""

import triton
import triton.language as tl

from .common import (
    BIG_DELTA, _activate, _chunk_partials, _chunk_range, _div, _given_stats, _load_affine,
    _normalize_range, _plane_rows, _safe_shifted_sums, _sqrt, _store_partial, _store_stats,
)


@triton.jit
def _fwd(
    X,  # input
    Y,  # output, same indexing with the y_* strides
    W,  # scale of plane (n, c) at n * w_sn + c * w_sc (w_sn = 0: per channel)
    B,  # shift, indexed like W
    RunMean,  # running mean per channel (read when not USE_INPUT_STATS)
    RunVar,  # running var per channel (read when not USE_INPUT_STATS)
    Stats,  # (5, rows) in ACC, its dtype: pivot, inv_s, mean_a, std_a, var_a
    rows,  # N * C planes; also the stride between Stats rows
    C,  # channels: plane (n, c) has flat index n * C + c
    rows_per_group,  # planes per group (C; or N * C when the batch dim folds into the channels)
    blocks_per_group,  # programs per group: cdiv(rows_per_group, BLOCK_R)
    HW,  # elements per plane
    x_sg, x_sr, x_ss,  # input strides: group, row in group, spatial
    y_sg, y_sr, y_ss,  # output strides
    w_sn, w_sc, b_sn, b_sc,  # parameter strides
    rv_stride,  # stride of RunMean / RunVar
    eps_hi, eps_lo,  # eps = eps_hi + eps_lo: float32 scalars that carry a float64 eps
    slope_hi, slope_lo,  # negative_slope, split the same way
    USE_INPUT_STATS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_STATS: tl.constexpr,
    WRITE_Y: tl.constexpr,  # False: statistics only (AdaIN's style statistics)
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_HW: tl.constexpr,  # tile width along a plane
    SINGLE_TILE: tl.constexpr,  # HW <= BLOCK_HW: the plane stays in registers, x is read once
):
    ACC = Stats.dtype.element_ty
    g64, r64, r_mask, row, n, c = _plane_rows(tl.program_id(0), blocks_per_group, rows_per_group,
                                              C, BLOCK_R)
    x_row = X + g64 * x_sg + r64 * x_sr
    y_row = Y + g64 * y_sg + r64 * y_sr
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    slope = tl.cast(slope_hi, ACC) + tl.cast(slope_lo, ACC)
    cols = tl.arange(0, BLOCK_HW).to(tl.int64)

    # ---- statistics: x_hat = ((x - pivot) * inv_s - mean_a) / std_a --------------------------
    if USE_INPUT_STATS:
        pivot = tl.load(x_row, mask=r_mask, other=0.0).to(ACC)
        if SINGLE_TILE:
            m0 = r_mask[:, None] & (cols[None, :] < HW)
            x0 = tl.load(x_row[:, None] + cols[None, :] * x_ss, mask=m0, other=0.0)
            d0 = tl.where(m0, x0.to(ACC) - pivot[:, None], 0.0)
            amax = tl.max(tl.abs(d0), axis=1)
            # Scale only when d^2 could overflow; otherwise inv_s == 1 and the math is unscaled.
            inv_s = tl.where(amax > BIG_DELTA, 1.0 / tl.maximum(amax, BIG_DELTA), 1.0).to(ACC)
            a0 = d0 * inv_s[:, None]
            hw = tl.full([BLOCK_R], HW, ACC)
            mean_a = _div(tl.sum(a0, axis=1), hw)  # correctly rounded: 2-element planes stay exact
            ac = tl.where(m0, a0 - mean_a[:, None], 0.0)
            var_a = _div(tl.sum(ac * ac, axis=1), hw)  # exact two-pass, in registers
        else:
            s1, s2, inv_s = _safe_shifted_sums(x_row, r_mask, 0, HW, x_ss, pivot, ACC, BLOCK_R,
                                               BLOCK_HW)
            hw = tl.full([BLOCK_R], HW, ACC)
            mean_a = _div(s1, hw)
            # clamp rounding below 0; a NaN variance stays NaN (as on the single-tile path)
            var_a = tl.maximum(_div(s2, hw) - mean_a * mean_a, 0.0,
                               propagate_nan=tl.PropagateNan.ALL)
        std_a = _sqrt(var_a + eps * inv_s * inv_s)
    else:
        pivot, inv_s, mean_a, std_a, var_a = _given_stats(RunMean, RunVar, c, rv_stride, r_mask,
                                                          eps, ACC, BLOCK_R)
    if STORE_STATS:
        _store_stats(Stats, rows, row, r_mask, pivot, inv_s, mean_a, std_a, var_a)

    # ---- normalize, affine, activation ------------------------------------------------------
    if WRITE_Y:
        w, b = _load_affine(W, B, n, c, w_sn, w_sc, b_sn, b_sc, r_mask, HAS_W, HAS_B, ACC, BLOCK_R)
        if SINGLE_TILE and USE_INPUT_STATS:  # x is still in registers
            x_hat = _div(d0 * inv_s[:, None] - mean_a[:, None], std_a[:, None])
            y = _activate(x_hat * w[:, None] + b[:, None], slope, ACTIVATION)
            tl.store(y_row[:, None] + cols[None, :] * y_ss, y.to(Y.dtype.element_ty), mask=m0)
        else:
            _normalize_range(x_row, y_row, r_mask, 0, HW, x_ss, y_ss, pivot, inv_s, mean_a, std_a,
                             w, b, slope, ACC, ACTIVATION, BLOCK_HW)


@triton.jit
def _fwd_split_stats(
    X,  # input
    Partials,  # (3, rows, num_chunks) ACC: per-chunk sum(a), sum(a^2), scale 1 / inv_s
    rows, C, rows_per_group, blocks_per_group, HW,
    CHUNK,  # elements per chunk, a multiple of BLOCK_HW; grid axis 1 walks the chunks
    x_sg, x_sr, x_ss,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """First launch of a split plane: pivot-shifted partial sums of one chunk."""
    ACC = Partials.dtype.element_ty
    g64, r64, r_mask, row, n, c = _plane_rows(tl.program_id(0), blocks_per_group, rows_per_group,
                                              C, BLOCK_R)
    chunk, num_chunks, start, end, _ = _chunk_range(r_mask, CHUNK, HW, BLOCK_R)
    x_row = X + g64 * x_sg + r64 * x_sr
    pivot = tl.load(x_row, mask=r_mask, other=0.0).to(ACC)  # the same pivot in every chunk
    s1, s2, inv_s = _safe_shifted_sums(x_row, r_mask, start, end, x_ss, pivot, ACC, BLOCK_R,
                                       BLOCK_HW)
    _store_partial(Partials, 0, s1, rows, row, r_mask, chunk, num_chunks)
    _store_partial(Partials, 1, s2, rows, row, r_mask, chunk, num_chunks)
    _store_partial(Partials, 2, 1.0 / inv_s, rows, row, r_mask, chunk, num_chunks)


@triton.jit
def _fwd_split_normalize(
    X, Y, W, B,
    RunMean, RunVar,  # given statistics (when not USE_INPUT_STATS)
    Stats,  # (5, rows): written by the chunk-0 programs
    Partials,  # (3, rows, num_chunks) from _fwd_split_stats (when USE_INPUT_STATS)
    rows, C, rows_per_group, blocks_per_group, HW, CHUNK,
    x_sg, x_sr, x_ss,
    y_sg, y_sr, y_ss,
    w_sn, w_sc, b_sn, b_sc,
    rv_stride,
    eps_hi, eps_lo, slope_hi, slope_lo,
    USE_INPUT_STATS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_STATS: tl.constexpr,
    WRITE_Y: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,  # next power of two >= num_chunks
):
    """Second launch of a split plane: combine the chunk sums (same fixed order in every program,
    so all chunks agree bit for bit), then normalize this chunk. With given statistics this is
    the only launch."""
    ACC = Stats.dtype.element_ty
    g64, r64, r_mask, row, n, c = _plane_rows(tl.program_id(0), blocks_per_group, rows_per_group,
                                              C, BLOCK_R)
    chunk, num_chunks, start, end, first = _chunk_range(r_mask, CHUNK, HW, BLOCK_R)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    slope = tl.cast(slope_hi, ACC) + tl.cast(slope_lo, ACC)
    x_row = X + g64 * x_sg + r64 * x_sr
    if USE_INPUT_STATS:
        s1c = _chunk_partials(Partials, 0, rows, row, r_mask, num_chunks, BLOCK_CHUNKS)
        s2c = _chunk_partials(Partials, 1, rows, row, r_mask, num_chunks, BLOCK_CHUNKS)
        scale_c = _chunk_partials(Partials, 2, rows, row, r_mask, num_chunks, BLOCK_CHUNKS)
        # Bring every chunk to the largest chunk scale s: a = d / s for all of them.
        scale = tl.where(r_mask, tl.max(scale_c, axis=1), 1.0)
        ratio = scale_c / scale[:, None]
        hw = tl.full([BLOCK_R], HW, ACC)
        mean_a = _div(tl.sum(s1c * ratio, axis=1), hw)
        var_a = tl.maximum(_div(tl.sum(s2c * ratio * ratio, axis=1), hw) - mean_a * mean_a, 0.0,
                           propagate_nan=tl.PropagateNan.ALL)
        inv_s = 1.0 / scale
        std_a = _sqrt(var_a + eps * inv_s * inv_s)
        pivot = tl.load(x_row, mask=r_mask, other=0.0).to(ACC)
    else:
        pivot, inv_s, mean_a, std_a, var_a = _given_stats(RunMean, RunVar, c, rv_stride, r_mask,
                                                          eps, ACC, BLOCK_R)
    if STORE_STATS:
        _store_stats(Stats, rows, row, first, pivot, inv_s, mean_a, std_a, var_a)
    if WRITE_Y:
        w, b = _load_affine(W, B, n, c, w_sn, w_sc, b_sn, b_sc, r_mask, HAS_W, HAS_B, ACC, BLOCK_R)
        y_row = Y + g64 * y_sg + r64 * y_sr
        _normalize_range(x_row, y_row, r_mask, start, end, x_ss, y_ss, pivot, inv_s, mean_a, std_a,
                         w, b, slope, ACC, ACTIVATION, BLOCK_HW)


@triton.jit
def _update_running_stats(
    Stats,  # (5, N * C) statistics written by the forward
    RunMean,  # running mean, updated in place
    RunVar,  # running var, updated in place
    N, C, HW,
    rv_stride,  # stride of RunMean / RunVar
    mom_hi, mom_lo,  # momentum = mom_hi + mom_lo
    BLOCK_C: tl.constexpr,
):
    """running = (1 - m) * running + m * mean over n of (mean_nc, unbiased var_nc), as torch."""
    ACC = Stats.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    c64 = c.to(tl.int64)
    rows = tl.cast(N, tl.int64) * C  # int64: 4 * rows below
    mean_sum = tl.zeros([BLOCK_C], dtype=ACC)
    var_sum = tl.zeros([BLOCK_C], dtype=ACC)
    row = c64  # n * C + c, stepped in int64
    for n in range(0, N):  # fixed order: deterministic
        pivot = tl.load(Stats + row, mask=cm, other=0.0)
        inv_s = tl.load(Stats + rows + row, mask=cm, other=1.0)
        mean_a = tl.load(Stats + 2 * rows + row, mask=cm, other=0.0)
        var_a = tl.load(Stats + 4 * rows + row, mask=cm, other=0.0)
        mean_sum += pivot + mean_a / inv_s
        var_sum += var_a / (inv_s * inv_s)
        row += C
    momentum = tl.cast(mom_hi, ACC) + tl.cast(mom_lo, ACC)
    rm = tl.load(RunMean + c * rv_stride, mask=cm, other=0.0).to(ACC)
    rv = tl.load(RunVar + c * rv_stride, mask=cm, other=0.0).to(ACC)
    rm = (1.0 - momentum) * rm + momentum * (mean_sum / N)
    rv = (1.0 - momentum) * rv + momentum * (var_sum * HW / (HW - 1) / N)  # unbiased, as torch
    tl.store(RunMean + c * rv_stride, rm.to(RunMean.dtype.element_ty), mask=cm)
    tl.store(RunVar + c * rv_stride, rv.to(RunVar.dtype.element_ty), mask=cm)
