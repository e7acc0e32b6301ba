"""Backward kernels: dx and per-plane dweight / dbias partials, then the fixed-order sum over n.

Plane addressing as in ``forward.py``. The pre-activation is recomputed from x and the saved
statistics; dweight / dbias never use atomics, so every run gives bitwise the same gradients.
"""

import triton
import triton.language as tl

from .common import (
    ACT_NONE, _activation_grad, _chunk_partials, _chunk_range, _div, _load_affine, _plane_rows,
    _store_partial,
)


@triton.jit
def _bwd_tile(x_row, dy_row, offs, m, x_ss, dy_ss, pivot, inv_s, mean_a, rstd_a, w, b, slope,
              ACC: tl.constexpr, ACTIVATION: tl.constexpr):
    """Loads one tile of x and dy; returns (x_hat, dz), dz = dy * act'(z) recomputed from x."""
    xt = tl.load(x_row[:, None] + offs[None, :] * x_ss, mask=m, other=0.0).to(ACC)
    dz = tl.load(dy_row[:, None] + offs[None, :] * dy_ss, mask=m, other=0.0).to(ACC)
    x_hat = ((xt - pivot[:, None]) * inv_s[:, None] - mean_a[:, None]) * rstd_a[:, None]
    if ACTIVATION != ACT_NONE:
        dz = _activation_grad(dz, x_hat * w[:, None] + b[:, None], slope, ACTIVATION)
    return tl.where(m, x_hat, 0.0), tl.where(m, dz, 0.0)


@triton.jit
def _load_stats(Stats, rows, row, r_mask, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """(pivot, inv_s, mean_a, 1 / std_a) of each plane, as the forward saved them."""
    rows = tl.cast(rows, tl.int64)  # 3 * rows wraps in int32 from ~7e8 planes on
    pivot = tl.load(Stats + row, mask=r_mask, other=0.0)
    inv_s = tl.load(Stats + rows + row, mask=r_mask, other=1.0)
    mean_a = tl.load(Stats + 2 * rows + row, mask=r_mask, other=0.0)
    std_a = tl.load(Stats + 3 * rows + row, mask=r_mask, other=1.0)
    return pivot, inv_s, mean_a, _div(tl.full([BLOCK_R], 1.0, ACC), std_a)


@triton.jit
def _bwd_sums(x_row, dy_row, r_mask, start, end, x_ss, dy_ss, pivot, inv_s, mean_a, rstd_a, w, b,
              slope, ACC: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_HW: tl.constexpr):
    """Over [start, end) of each plane: c1 = sum(dz * x_hat), c2 = sum(dz)."""
    cols = tl.arange(0, BLOCK_HW).to(tl.int64)
    c1 = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    c2 = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    for t in range(start, end, BLOCK_HW):
        offs = t + cols
        m = r_mask[:, None] & (offs[None, :] < end)
        x_hat, dz = _bwd_tile(x_row, dy_row, offs, m, x_ss, dy_ss, pivot, inv_s, mean_a, rstd_a,
                              w, b, slope, ACC, ACTIVATION)
        c1 += dz * x_hat
        c2 += dz
    return tl.sum(c1, axis=1), tl.sum(c2, axis=1)


@triton.jit
def _bwd_dx_range(x_row, dy_row, dx_row, r_mask, start, end, x_ss, dy_ss, dx_ss, pivot, inv_s,
                  mean_a, rstd_a, w, b, slope, k, c1n, c2n, ACC: tl.constexpr,
                  ACTIVATION: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dx = k * (dz - c2n - x_hat * c1n) over [start, end), k = rstd * w."""
    cols = tl.arange(0, BLOCK_HW).to(tl.int64)
    for t in range(start, end, BLOCK_HW):
        offs = t + cols
        m = r_mask[:, None] & (offs[None, :] < end)
        x_hat, dz = _bwd_tile(x_row, dy_row, offs, m, x_ss, dy_ss, pivot, inv_s, mean_a, rstd_a,
                              w, b, slope, ACC, ACTIVATION)
        dx = k[:, None] * (dz - c2n[:, None] - x_hat * c1n[:, None])
        tl.store(dx_row[:, None] + offs[None, :] * dx_ss, dx.to(dx_row.dtype.element_ty), mask=m)


@triton.jit
def _dx_coefficients(c1, c2, rstd_a, inv_s, w, HW, USE_INPUT_STATS: tl.constexpr):
    """(k, c1 / HW, c2 / HW) of dx = k * (dz - c2/HW - x_hat * c1/HW); with given statistics
    the mean and variance are constants and both correction terms vanish."""
    k = rstd_a * inv_s * w
    if USE_INPUT_STATS:
        # Correctly rounded: a constant plane under a uniform dy needs c2 / HW == dz exactly for
        # dx == 0 (the approximate division is off by an ulp for some HW).
        hw = tl.full(c1.shape, HW, c1.dtype)
        c1n = _div(c1, hw)
        c2n = _div(c2, hw)
    else:
        c1n = tl.zeros_like(c1)
        c2n = tl.zeros_like(c2)
    return k, c1n, c2n


@triton.jit
def _bwd(
    X,  # input of the forward
    DY,  # gradient of the output
    DX,  # gradient of the input (written)
    W,  # scale (indexed as in the forward)
    B,  # shift: needed only to recompute the pre-activation
    Stats,  # (5, rows) from the forward
    DWp,  # (rows,) ACC: per-plane sum(dz * x_hat), the dweight partials
    DBp,  # (rows,) ACC: per-plane sum(dz), the dbias partials
    rows, C, rows_per_group, blocks_per_group, HW,
    x_sg, x_sr, x_ss,
    dy_sg, dy_sr, dy_ss,
    dx_sg, dx_sr, dx_ss,
    w_sn, w_sc, b_sn, b_sc,
    slope_hi, slope_lo,
    USE_INPUT_STATS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # x and dy stay in registers between the sums and dx
):
    ACC = Stats.dtype.element_ty
    g64, r64, r_mask, row, n, c = _plane_rows(tl.program_id(0), blocks_per_group, rows_per_group,
                                              C, BLOCK_R)
    x_row = X + g64 * x_sg + r64 * x_sr
    dy_row = DY + g64 * dy_sg + r64 * dy_sr
    dx_row = DX + g64 * dx_sg + r64 * dx_sr
    slope = tl.cast(slope_hi, ACC) + tl.cast(slope_lo, ACC)
    pivot, inv_s, mean_a, rstd_a = _load_stats(Stats, rows, row, r_mask, ACC, BLOCK_R)
    w, b = _load_affine(W, B, n, c, w_sn, w_sc, b_sn, b_sc, r_mask, HAS_W, HAS_B, ACC, BLOCK_R)

    if SINGLE_TILE:  # one read of x and dy
        cols = tl.arange(0, BLOCK_HW).to(tl.int64)
        m0 = r_mask[:, None] & (cols[None, :] < HW)
        x_hat0, dz0 = _bwd_tile(x_row, dy_row, cols, m0, x_ss, dy_ss, pivot, inv_s, mean_a, rstd_a,
                                w, b, slope, ACC, ACTIVATION)
        c1 = tl.sum(dz0 * x_hat0, axis=1)
        c2 = tl.sum(dz0, axis=1)
    else:
        c1, c2 = _bwd_sums(x_row, dy_row, r_mask, 0, HW, x_ss, dy_ss, pivot, inv_s, mean_a, rstd_a,
                           w, b, slope, ACC, ACTIVATION, BLOCK_R, BLOCK_HW)
    tl.store(DWp + row, c1, mask=r_mask)
    tl.store(DBp + row, c2, mask=r_mask)

    k, c1n, c2n = _dx_coefficients(c1, c2, rstd_a, inv_s, w, HW, USE_INPUT_STATS)
    if SINGLE_TILE:
        dx = k[:, None] * (dz0 - c2n[:, None] - x_hat0 * c1n[:, None])
        tl.store(dx_row[:, None] + cols[None, :] * dx_ss, dx.to(DX.dtype.element_ty), mask=m0)
    else:
        _bwd_dx_range(x_row, dy_row, dx_row, r_mask, 0, HW, x_ss, dy_ss, dx_ss, pivot, inv_s,
                      mean_a, rstd_a, w, b, slope, k, c1n, c2n, ACC, ACTIVATION, BLOCK_HW)


@triton.jit
def _bwd_split_sums(
    X, DY, W, B, Stats,
    Partials,  # (2, rows, num_chunks) ACC: per-chunk c1, c2
    rows, C, rows_per_group, blocks_per_group, HW, CHUNK,
    x_sg, x_sr, x_ss,
    dy_sg, dy_sr, dy_ss,
    w_sn, w_sc, b_sn, b_sc,
    slope_hi, slope_lo,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """First backward launch of a split plane: the chunk's c1, c2."""
    ACC = Stats.dtype.element_ty
    g64, r64, r_mask, row, n, c = _plane_rows(tl.program_id(0), blocks_per_group, rows_per_group,
                                              C, BLOCK_R)
    chunk, num_chunks, start, end, _ = _chunk_range(r_mask, CHUNK, HW, BLOCK_R)
    slope = tl.cast(slope_hi, ACC) + tl.cast(slope_lo, ACC)
    pivot, inv_s, mean_a, rstd_a = _load_stats(Stats, rows, row, r_mask, ACC, BLOCK_R)
    w, b = _load_affine(W, B, n, c, w_sn, w_sc, b_sn, b_sc, r_mask, HAS_W, HAS_B, ACC, BLOCK_R)
    c1, c2 = _bwd_sums(X + g64 * x_sg + r64 * x_sr, DY + g64 * dy_sg + r64 * dy_sr, r_mask, start,
                       end, x_ss, dy_ss, pivot, inv_s, mean_a, rstd_a, w, b, slope, ACC, ACTIVATION,
                       BLOCK_R, BLOCK_HW)
    _store_partial(Partials, 0, c1, rows, row, r_mask, chunk, num_chunks)
    _store_partial(Partials, 1, c2, rows, row, r_mask, chunk, num_chunks)


@triton.jit
def _bwd_split_dx(
    X, DY, DX, W, B, Stats,
    Partials,  # (2, rows, num_chunks) from _bwd_split_sums
    DWp, DBp,  # (rows,) per-plane partials, written by the chunk-0 programs
    rows, C, rows_per_group, blocks_per_group, HW, CHUNK,
    x_sg, x_sr, x_ss,
    dy_sg, dy_sr, dy_ss,
    dx_sg, dx_sr, dx_ss,
    w_sn, w_sc, b_sn, b_sc,
    slope_hi, slope_lo,
    USE_INPUT_STATS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    """Second backward launch of a split plane: combine c1, c2 in a fixed order, write dx."""
    ACC = Stats.dtype.element_ty
    g64, r64, r_mask, row, n, c = _plane_rows(tl.program_id(0), blocks_per_group, rows_per_group,
                                              C, BLOCK_R)
    chunk, num_chunks, start, end, first = _chunk_range(r_mask, CHUNK, HW, BLOCK_R)
    slope = tl.cast(slope_hi, ACC) + tl.cast(slope_lo, ACC)
    c1 = tl.sum(_chunk_partials(Partials, 0, rows, row, r_mask, num_chunks, BLOCK_CHUNKS), axis=1)
    c2 = tl.sum(_chunk_partials(Partials, 1, rows, row, r_mask, num_chunks, BLOCK_CHUNKS), axis=1)
    tl.store(DWp + row, c1, mask=first)
    tl.store(DBp + row, c2, mask=first)
    pivot, inv_s, mean_a, rstd_a = _load_stats(Stats, rows, row, r_mask, ACC, BLOCK_R)
    w, b = _load_affine(W, B, n, c, w_sn, w_sc, b_sn, b_sc, r_mask, HAS_W, HAS_B, ACC, BLOCK_R)
    k, c1n, c2n = _dx_coefficients(c1, c2, rstd_a, inv_s, w, HW, USE_INPUT_STATS)
    _bwd_dx_range(X + g64 * x_sg + r64 * x_sr, DY + g64 * dy_sg + r64 * dy_sr,
                  DX + g64 * dx_sg + r64 * dx_sr, r_mask, start, end, x_ss, dy_ss, dx_ss, pivot,
                  inv_s, mean_a, rstd_a, w, b, slope, k, c1n, c2n, ACC, ACTIVATION, BLOCK_HW)


@triton.jit
def _sum_partials_over_n(
    DWp,  # (N, C) ACC partials of dweight
    DBp,  # (N, C) ACC partials of dbias
    DW,  # (C,) dweight, written in the weight's dtype
    DB,  # (C,) dbias, written in the bias's dtype
    N, C,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sums the per-plane partials over n in a fixed order: bitwise deterministic, no atomics."""
    ACC = DWp.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    c64 = c.to(tl.int64)
    dw = tl.zeros([BLOCK_C], dtype=ACC)
    db = tl.zeros([BLOCK_C], dtype=ACC)
    row = c64  # n * C + c, stepped in int64 (n * C in int32 wraps from 2^31 planes on)
    for n in range(0, N):
        if HAS_DW:
            dw += tl.load(DWp + row, mask=cm, other=0.0)
        if HAS_DB:
            db += tl.load(DBp + row, mask=cm, other=0.0)
        row += C
    if HAS_DW:
        tl.store(DW + c, dw.to(DW.dtype.element_ty), mask=cm)
    if HAS_DB:
        tl.store(DB + c, db.to(DB.dtype.element_ty), mask=cm)
