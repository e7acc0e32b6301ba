"""Backward kernels: the split planes' sums pass, the dx pass, the fixed-order sum over n, and
the gradient through per-plane statistics (AdaIN's style).

A backward is one ``_bwd`` launch (preceded by ``_bwd_split_sums`` and ``_bwd_combine`` when the
planes are split), then ``_sum_partials_over_n`` for dweight / dbias. The pre-activation is
recomputed from x and the saved statistics; dweight / dbias never use atomics, so every run gives
bitwise the same gradients. Views and geometry are described in ``common.py``; inside a program,
a plane's ``(start pointers, spatial stride)``, its normalizer (``rnorm``, from the saved
statistics) and its affine travel as tuples.
"""

import triton
import triton.language as tl

from .common import (
    ACT_NONE, FROM_PARTIALS, FROM_LOOP, FROM_TILE, SUM_DZ, SUM_DZ_XHAT, _activation_grad,
    _chunk_partials, _chunk_range, _div, _host_float, _load_param, _load_stats, _narrow, _partial,
    _load_rows, _plane_block, _plane_nc, _plane_start, _program_channels, _program_planes, _field,
    _std, _store_rows, _swept_tile, _tile, _tile_mask, _widen, segment,
)


@triton.jit
def _saved_rnorm(Stats, num_planes, plane, mask, eps, INPUT_STATS: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """The backward's normalizer ``rnorm`` = (pivot, gain, offset) of each plane, from its saved
    statistics: x_hat = ((x - pivot) * inv_scale - mean) / std = (x - pivot) * gain - offset,
    std recomputed as the forward did; gain is also rstd in units of x (the forward's
    ``_normalizer`` divides by std instead)."""
    pivot, inv_scale, mean, var = _load_stats(Stats, num_planes, plane, mask)
    std = _std(var, inv_scale, _host_float(eps, ACC), INPUT_STATS)  # the forward's, bit for bit
    rstd = _div(tl.full([BLOCK_R], 1.0, ACC), std)
    return pivot, inv_scale * rstd, mean * rstd


@triton.jit
def _load_x_hat(x_planes, tile, rnorm, ACC: tl.constexpr):
    """One tile of x, normalized with ``rnorm`` (``_saved_rnorm``; 0 on masked lanes)."""
    pivot, gain, offset = rnorm
    xt = _widen(_load_rows(x_planes, tile), ACC)
    x_hat = (xt - pivot[:, None]) * gain[:, None] - offset[:, None]
    return tl.where(_tile_mask(tile), x_hat, 0.0)


@triton.jit
def _program_inputs(x, dy, w, b, Stats, geometry, planes, eps, slope, INPUT_STATS: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """What the gradients of this program's ``planes = (rows, plane, mask)`` read: (x planes,
    dy planes, the normalizer (``_saved_rnorm``), affine (scale, shift, negative slope))."""
    rows, plane, mask = planes
    nc = _plane_nc(plane, geometry[1])
    rnorm = _saved_rnorm(Stats, geometry[0], plane, mask, eps, INPUT_STATS, ACC, BLOCK_R)
    affine = (_load_param(w, nc, mask, 1.0, ACC, BLOCK_R),
              _load_param(b, nc, mask, 0.0, ACC, BLOCK_R), _host_float(slope, ACC))
    return _plane_start(x, rows), _plane_start(dy, rows), rnorm, affine


@triton.jit
def _tile_grads(inputs, r_planes, tile, ACC: tl.constexpr, ACTIVATION: tl.constexpr):
    """Loads one tile of x and dy; returns (x_hat, dz), dz = dy * act'(z) recomputed from x
    (and from the residual's planes ``r_planes``, when one was added before the activation)."""
    x_planes, dy_planes, rnorm, affine = inputs
    scale_w, shift_b, negative_slope = affine
    x_hat = _load_x_hat(x_planes, tile, rnorm, ACC)
    dz = _widen(_load_rows(dy_planes, tile), ACC)
    if ACTIVATION != ACT_NONE:
        z = x_hat * scale_w[:, None] + shift_b[:, None]
        if r_planes is not None:
            z += _widen(_load_rows(r_planes, tile), ACC)
        dz = tl.where(_tile_mask(tile), _activation_grad(dz, z, negative_slope, ACTIVATION), 0.0)
    return x_hat, dz


@triton.jit
def _write_dx(dx_planes, dr_planes, tile, x_hat, dz, coefficients):
    """dx = dx_scale * (dz - mean_dz - x_hat * mean_dz_xhat) for one tile; ``coefficients`` is
    (dx_scale, mean_dz, mean_dz_xhat) per plane. A residual added before the activation gets
    dz itself, written to ``dr_planes`` (None: not needed). Compiled, the product is fused into the
    difference, fma(-x_hat, mean_dz_xhat, dz - mean_dz): a constant plane (x_hat = 0) under a
    uniform dy (mean_dz == dz, correctly rounded) still gets exactly 0."""
    dx_scale, mean_dz, mean_dz_xhat = coefficients
    grad = dx_scale[:, None] * (dz - mean_dz[:, None] - x_hat * mean_dz_xhat[:, None])
    _store_rows(dx_planes, tile, grad)
    if dr_planes is not None:
        _store_rows(dr_planes, tile, dz)


@triton.jit
def _streamed_sums(inputs, r_planes, mask, span, ACC: tl.constexpr, ACTIVATION: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Over ``span = (start, end)`` of each plane, in tiles: (sum(dz * x_hat), sum(dz))."""
    start, end = span
    sum_dz_xhat = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    sum_dz = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    for t in range(start, end, BLOCK_HW):
        x_hat, dz = _tile_grads(inputs, r_planes, _tile(t, mask, end, BLOCK_HW, BLOCK_HW), ACC,
                                ACTIVATION)
        sum_dz_xhat += dz * x_hat
        sum_dz += dz
    return tl.sum(sum_dz_xhat, axis=1), tl.sum(sum_dz, axis=1)


@triton.jit
def _bwd_split_sums(
    x,  # planes view of the forward's input
    dy,  # planes view of the output's gradient
    r,  # planes view of the residual added before the activation (recomputes dz), or None
    w,  # param view of the scale (recomputes the pre-activation and dz), or None
    b,  # param view of the shift, or None
    Stats,  # (NUM_STATS, N * C) from the forward
    Partials,  # (NUM_SUMS, N * C, chunks) ACC: SUM_DZ_XHAT, SUM_DZ of each chunk
    geometry,  # (N * C, C, HW, rows per group)
    eps,  # (hi, lo) float32 pair: the forward's
    slope,  # leaky_relu's negative slope, (hi, lo)
    USE_INPUT_STATS: tl.constexpr,  # False: the statistics were given (running statistics)
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_HW: tl.constexpr,  # tile width along a plane
):
    """First backward pass over a split plane (grid: row programs x chunks): the chunk's sums,
    for ``_bwd_combine`` to combine."""
    ACC: tl.constexpr = Stats.dtype.element_ty
    num_planes, C, HW, _ = geometry
    rows, plane, mask = _program_planes(geometry, BLOCK_R)
    inputs = _program_inputs(x, dy, w, b, Stats, geometry, (rows, plane, mask), eps, slope,
                             USE_INPUT_STATS, ACC, BLOCK_R)
    span, _ = _chunk_range(HW, mask, BLOCK_HW, BLOCK_R, True)
    r_planes = None  # (a jit function returning None does not compile on Triton 3.6)
    if r is not None:
        r_planes = _plane_start(r, rows)
    sum_dz_xhat, sum_dz = _streamed_sums(inputs, r_planes, mask, span, ACC, ACTIVATION, BLOCK_R,
                                         BLOCK_HW)
    tl.store(_partial(Partials, SUM_DZ_XHAT, num_planes, plane), sum_dz_xhat, mask=mask)
    tl.store(_partial(Partials, SUM_DZ, num_planes, plane), sum_dz, mask=mask)


@triton.jit
def _bwd_combine(
    Partials,  # (NUM_SUMS, N * C, chunks) from _bwd_split_sums
    PlaneSums,  # (NUM_SUMS, N * C) ACC, written: each plane's sums
    num_planes, chunks,
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_CHUNKS: tl.constexpr,  # next power of two >= chunks
):
    """Each split plane's sums from its chunks' partials, in a fixed order (grid: planes /
    BLOCK_R), for ``_bwd`` with ``SUMS_FROM == FROM_PARTIALS`` to read."""
    plane, mask = _plane_block(num_planes, BLOCK_R)
    sum_dz_xhat = _chunk_partials(Partials, SUM_DZ_XHAT, num_planes, plane, mask, chunks,
                                  BLOCK_CHUNKS)
    sum_dz = _chunk_partials(Partials, SUM_DZ, num_planes, plane, mask, chunks, BLOCK_CHUNKS)
    tl.store(_field(PlaneSums, SUM_DZ_XHAT, num_planes, plane), tl.sum(sum_dz_xhat, axis=1),
             mask=mask)
    tl.store(_field(PlaneSums, SUM_DZ, num_planes, plane), tl.sum(sum_dz, axis=1), mask=mask)


@triton.jit
def _bwd(
    x,  # planes view of the forward's input
    dy,  # planes view of the output's gradient
    dx,  # planes view of the input's gradient (written)
    r,  # planes view of the residual added before the activation (recomputes dz), or None
    dr,  # planes view of the residual's gradient, dz (written), or None
    w,  # param view of the scale, or None
    b,  # param view of the shift (recomputes the pre-activation), or None
    Stats,  # (NUM_STATS, N * C) from the forward
    PlaneSums,  # (NUM_SUMS, N * C) ACC: written by chunk 0 (the dweight / dbias partials), or
                # read with SUMS_FROM == FROM_PARTIALS (written by _bwd_combine)
    geometry,  # (N * C, C, HW, rows per group)
    eps,  # (hi, lo): the forward's
    slope,  # (hi, lo)
    SUMS_FROM: tl.constexpr,  # FROM_TILE, FROM_LOOP or FROM_PARTIALS
    USE_INPUT_STATS: tl.constexpr,  # False: the statistics were given (constants of x)
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # the whole plane with FROM_TILE
):
    """dx = rstd * w * (dz - (sum(dz) + x_hat * sum(dz * x_hat)) / HW) over a chunk of BLOCK_R
    planes (grid: row programs x chunks; one chunk unless the planes are split)."""
    ACC: tl.constexpr = Stats.dtype.element_ty
    # The dx sweep after a sums sweep walks the tiles backwards: the ones read last are the
    # likeliest to be in L2 still.
    REVERSE: tl.constexpr = SUMS_FROM == FROM_LOOP
    num_planes, C, HW, _ = geometry
    rows, plane, mask = _program_planes(geometry, BLOCK_R)
    inputs = _program_inputs(x, dy, w, b, Stats, geometry, (rows, plane, mask), eps, slope,
                             USE_INPUT_STATS, ACC, BLOCK_R)
    span, chunk0 = _chunk_range(HW, mask, BLOCK_HW, BLOCK_R, SUMS_FROM == FROM_PARTIALS)
    r_planes = None  # (a jit function returning None does not compile on Triton 3.6)
    if r is not None:
        r_planes = _plane_start(r, rows)

    if SUMS_FROM == FROM_TILE:  # one read of x and dy, kept in registers for dx
        tile = _tile(0, mask, HW, BLOCK_HW,
                     segment(BLOCK_HW, x[0].dtype.element_ty.primitive_bitwidth))
        x_hat, dz = _tile_grads(inputs, r_planes, tile, ACC, ACTIVATION)
        sum_dz_xhat = tl.sum(dz * x_hat, axis=1)
        sum_dz = tl.sum(dz, axis=1)
    elif SUMS_FROM == FROM_LOOP:
        sum_dz_xhat, sum_dz = _streamed_sums(inputs, r_planes, mask, span, ACC, ACTIVATION,
                                             BLOCK_R, BLOCK_HW)
    else:  # FROM_PARTIALS
        sum_dz_xhat = tl.load(_field(PlaneSums, SUM_DZ_XHAT, num_planes, plane), mask=mask,
                              other=0.0)
        sum_dz = tl.load(_field(PlaneSums, SUM_DZ, num_planes, plane), mask=mask, other=0.0)
    if SUMS_FROM != FROM_PARTIALS:
        tl.store(_field(PlaneSums, SUM_DZ_XHAT, num_planes, plane), sum_dz_xhat, mask=chunk0)
        tl.store(_field(PlaneSums, SUM_DZ, num_planes, plane), sum_dz, mask=chunk0)

    # dx = dx_scale * (dz - mean_dz - x_hat * mean_dz_xhat); with given statistics the mean and
    # variance are constants of x and both correction terms vanish.
    _, _, rnorm, affine = inputs
    dx_scale = rnorm[1] * affine[0]
    if USE_INPUT_STATS:
        # Correctly rounded: a constant plane under a uniform dy needs mean_dz == dz exactly for
        # dx == 0 (the approximate division is off by an ulp for some HW).
        hw = tl.full([BLOCK_R], HW, ACC)
        mean_dz_xhat = _div(sum_dz_xhat, hw)
        mean_dz = _div(sum_dz, hw)
    else:
        mean_dz_xhat = tl.zeros([BLOCK_R], dtype=ACC)
        mean_dz = tl.zeros([BLOCK_R], dtype=ACC)
    dx_planes = _plane_start(dx, rows)
    dr_planes = None
    if dr is not None:
        dr_planes = _plane_start(dr, rows)
    coefficients = (dx_scale, mean_dz, mean_dz_xhat)
    if SUMS_FROM == FROM_TILE:  # x_hat and dz are still in registers
        _write_dx(dx_planes, dr_planes, tile, x_hat, dz, coefficients)
    else:
        for t in range(span[0], span[1], BLOCK_HW):
            tile = _tile(_swept_tile(t, span, REVERSE, BLOCK_HW), mask, span[1], BLOCK_HW,
                         BLOCK_HW)
            x_hat, dz = _tile_grads(inputs, r_planes, tile, ACC, ACTIVATION)
            _write_dx(dx_planes, dr_planes, tile, x_hat, dz, coefficients)


@triton.jit
def _sum_partials_over_n(
    PlaneSums,  # (NUM_SUMS, N * C) ACC from _bwd
    DW,  # (C,) dweight, written in the weight's dtype; None: not needed
    DB,  # (C,) dbias, written in the bias's dtype; None: not needed
    N, C,
    BLOCK_C: tl.constexpr,  # channels per program
):
    """Sums the per-plane partials over n in a fixed order: bitwise deterministic, no atomics."""
    ACC: tl.constexpr = PlaneSums.dtype.element_ty
    c, mask, plane, num_planes = _program_channels(N, C, BLOCK_C)
    dw = tl.zeros([BLOCK_C], dtype=ACC)
    db = tl.zeros([BLOCK_C], dtype=ACC)
    for n in range(0, N):
        if DW is not None:
            dw += tl.load(_field(PlaneSums, SUM_DZ_XHAT, num_planes, plane), mask=mask, other=0.0)
        if DB is not None:
            db += tl.load(_field(PlaneSums, SUM_DZ, num_planes, plane), mask=mask, other=0.0)
        plane += C
    if DW is not None:
        tl.store(DW + c, _narrow(dw, DW.dtype.element_ty), mask=mask)
    if DB is not None:
        tl.store(DB + c, _narrow(db, DB.dtype.element_ty), mask=mask)


@triton.jit
def _stats_bwd(
    x,  # planes view of the input whose statistics were taken
    dx,  # planes view of its gradient (written)
    dmean,  # param view of the gradient of the (N, C) means, or None
    dstd,  # param view of the gradient of the (N, C) stds, or None
    Stats,  # (NUM_STATS, N * C) from the statistics pass
    geometry,  # (N * C, C, HW, rows per group)
    eps,  # (hi, lo): the statistics pass's
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    CHUNKED: tl.constexpr,  # grid axis 1 walks chunks of the planes
):
    """dx = (dmean + dstd * x_hat) / HW: the gradient through each plane's mean and
    std = sqrt(biased var + eps) (AdaIN's style statistics). Elementwise: x read once."""
    ACC: tl.constexpr = Stats.dtype.element_ty
    num_planes, C, HW, _ = geometry
    rows, plane, mask = _program_planes(geometry, BLOCK_R)
    nc = _plane_nc(plane, C)
    span, _ = _chunk_range(HW, mask, BLOCK_HW, BLOCK_R, CHUNKED)
    # the gradient of sqrt(var + eps) as autograd takes it: no invstd rule at var + eps == 0
    rnorm = _saved_rnorm(Stats, num_planes, plane, mask, eps, False, ACC, BLOCK_R)
    hw = tl.full([BLOCK_R], HW, ACC)
    grad_mean = _div(_load_param(dmean, nc, mask, 0.0, ACC, BLOCK_R), hw)
    grad_std = _div(_load_param(dstd, nc, mask, 0.0, ACC, BLOCK_R), hw)
    x_planes = _plane_start(x, rows)
    dx_planes = _plane_start(dx, rows)
    start, end = span
    for t in range(start, end, BLOCK_HW):
        tile = _tile(t, mask, end, BLOCK_HW, BLOCK_HW)
        x_hat = _load_x_hat(x_planes, tile, rnorm, ACC)
        _store_rows(dx_planes, tile, grad_mean[:, None] + grad_std[:, None] * x_hat)
