"""Forward kernels: the split planes' statistics and combine passes, the normalize pass, the
running-stat update.

A forward is one ``_fwd`` launch, preceded by ``_fwd_split_stats`` and ``_fwd_combine`` when long
planes are split across programs to fill the GPU. Views and geometry are described in
``common.py``.
"""

import triton
import triton.language as tl

from .common import (
    CHUNK_HI, CHUNK_LO, CHUNK_RMS, FROM_PARTIALS, FROM_LOOP, FROM_RUNNING, FROM_TILE,
    _activate, _chunk_partials, _chunk_range, _chunk_sizes, _div, _full_tile, _host_float,
    _load_param, _load_rows, _load_running, _load_stats, _partial, _plane_block, _plane_nc,
    _plane_start, _program_channels, _program_planes, _std, _store_rows, _store_running,
    _store_stats, _swept_tile, _tile, _tile_mask, _widen, segment,
)
from .moments import (
    _chunk_summary, _combine_chunks, _load_pivot, _safe_streamed_moments, _tile_stats,
)


@triton.jit
def _normalizer(stats, std, affine, EXACT: tl.constexpr):
    """Per plane, what ``_write_y`` needs for y = act(x_hat * w + b), x_hat = ((x - pivot) *
    inv_scale - mean) / std: (pivot, gain, offset) with x_hat * w + b = (x - pivot) * gain +
    offset, one division per plane. With ``EXACT`` (eps == 0) the per-element division
    instead, (pivot, inv_scale, mean, std, w, b): it keeps 2-element planes at exactly +-1
    (x * (1 / x) is not always 1), which only eps == 0 makes exact in the first place.
    ``gain = w / std`` rounds once (not w * (1 / std)): y keeps the division's accuracy within
    an ulp or so."""
    pivot, inv_scale, mean, _ = stats
    scale_w, shift_b = affine
    if EXACT:
        return pivot, inv_scale, mean, std, scale_w, shift_b
    else:
        gain = _div(scale_w, std)
        return pivot, inv_scale * gain, shift_b - mean * gain


@triton.jit
def _write_y(y_planes, r_planes, tile, xt, normalizer, slope, ACTIVATION: tl.constexpr,
             EXACT: tl.constexpr):
    """Stores y = act(z + r) for one tile ``xt`` of x (z: ``_normalized``); ``r_planes``: the
    residual's planes (read once, added before the activation and the rounding to y's dtype),
    or None."""
    z = _normalized(xt, normalizer, EXACT)
    if r_planes is not None:
        z += _widen(_load_rows(r_planes, tile), z.dtype)
    _store_rows(y_planes, tile, _activate(z, slope, ACTIVATION))


@triton.jit
def _normalized(xt, normalizer, EXACT: tl.constexpr):
    """z = x_hat * w + b of a tile ``xt`` of x (``normalizer``: ``_normalizer``), in the
    accumulation dtype."""
    pivot = normalizer[0]
    delta = _widen(xt, pivot.dtype) - pivot[:, None]
    if EXACT:
        _, inv_scale, mean, std, scale_w, shift_b = normalizer
        x_hat = _div(delta * inv_scale[:, None] - mean[:, None], std[:, None])
        z = x_hat * scale_w[:, None] + shift_b[:, None]
    else:
        _, gain, offset = normalizer
        z = delta * gain[:, None] + offset[:, None]
    return z


@triton.jit
def _fwd_split_stats(
    x,  # planes view of the input
    Partials,  # (NUM_FWD_PARTIALS, N * C, chunks) ACC: CHUNK_HI, CHUNK_LO, CHUNK_RMS
    geometry,  # (N * C, C, HW, rows per group)
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_HW: tl.constexpr,  # tile width along a plane
    TILE_HW: tl.constexpr = 0,  # > 0: every chunk fits one tile of this width
    FULL: tl.constexpr = False,  # every chunk is that whole tile, of planes that all exist
    LANE_PLANES: tl.constexpr = 0,  # > 0: planes adjacent in memory, loaded that many per lane
):
    """First pass over a split plane (grid: row programs x chunks): the chunk's mean and RMS
    deviation, for ``_fwd_combine`` to combine. A chunk held in one tile takes a single tile's
    statistics (two reductions; a full tile with no mask), a longer one the stream's
    (heuristics.statistics_pass)."""
    ACC: tl.constexpr = tl.float64 if x[0].dtype.element_ty == tl.float64 else tl.float32
    num_planes, C, HW, _ = geometry
    rows, plane, mask = _program_planes(geometry, BLOCK_R)
    span, _ = _chunk_range(HW, mask, BLOCK_HW, BLOCK_R, True)
    x_planes = _plane_start(x, rows)
    pivot = _load_pivot(x_planes, mask, ACC)
    count = tl.cast(tl.maximum(span[1] - span[0], 1), ACC)
    if TILE_HW:
        if FULL:
            tile = _full_tile(span[0], TILE_HW, TILE_HW)
        else:
            tile = _tile(span[0], mask, span[1], TILE_HW, TILE_HW)
        xt = _widen(_load_rows(x_planes, tile, LANE_PLANES), ACC)
        pivot, inv_scale, rest, var = _tile_stats(xt, _tile_mask(tile), pivot, count, mask, x[0],
                                                  ACC)
    else:
        pivot, rest, m2, inv_scale = _safe_streamed_moments(
            x_planes, mask, span, pivot, x[0], ACC, BLOCK_R, BLOCK_HW)
        var = m2 * (1.0 / count)
    hi, lo, rms = _chunk_summary(pivot, rest, var, inv_scale, mask, x[0])
    tl.store(_partial(Partials, CHUNK_HI, num_planes, plane), hi, mask=mask)
    tl.store(_partial(Partials, CHUNK_LO, num_planes, plane), lo, mask=mask)
    tl.store(_partial(Partials, CHUNK_RMS, num_planes, plane), rms, mask=mask)


@triton.jit
def _fwd_combine(
    Partials,  # (NUM_FWD_PARTIALS, N * C, chunks) from _fwd_split_stats
    Stats,  # (NUM_STATS, N * C) ACC, written
    num_planes, HW, chunks,
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_CHUNKS: tl.constexpr,  # next power of two >= chunks
    BLOCK_HW: tl.constexpr,  # the split pass's tile width (chunks are whole tiles)
):
    """Each split plane's statistics from its chunks' summaries, combined once in a fixed order
    (grid: planes / BLOCK_R): the normalize pass then reads 4 values per plane, not the partials
    of every chunk."""
    ACC: tl.constexpr = Stats.dtype.element_ty
    plane, mask = _plane_block(num_planes, BLOCK_R)
    summaries = (_chunk_partials(Partials, CHUNK_HI, num_planes, plane, mask, chunks, BLOCK_CHUNKS),
                 _chunk_partials(Partials, CHUNK_LO, num_planes, plane, mask, chunks, BLOCK_CHUNKS),
                 _chunk_partials(Partials, CHUNK_RMS, num_planes, plane, mask, chunks,
                                 BLOCK_CHUNKS))
    stats = _combine_chunks(summaries, _chunk_sizes(HW, chunks, ACC, BLOCK_HW, BLOCK_CHUNKS),
                            tl.full([BLOCK_R], HW, ACC), ACC)
    _store_stats(Stats, num_planes, plane, mask, stats)


@triton.jit
def _fwd(
    x,  # planes view of the input
    y,  # planes view of the output; None: statistics only (AdaIN's style statistics)
    r,  # planes view of a residual added before the activation, or None
    w,  # param view of the scale of plane (n, c) (n stride 0: per channel); None: 1
    b,  # param view of the shift; None: 0
    running,  # running view, read when STATS_FROM == FROM_RUNNING, else None
    Stats,  # (NUM_STATS, N * C) ACC: written by each plane's chunk-0 program, or None (not
            # kept); read with STATS_FROM == FROM_PARTIALS (written by _fwd_combine)
    geometry,  # (N * C, C, HW, rows per group)
    eps,  # (hi, lo) float32 pair
    slope,  # leaky_relu's negative slope, (hi, lo)
    STATS_FROM: tl.constexpr,  # FROM_TILE, FROM_LOOP, FROM_PARTIALS or FROM_RUNNING
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,  # planes per program
    BLOCK_HW: tl.constexpr,  # tile width along a plane (the whole plane with FROM_TILE)
    EXACT: tl.constexpr = False,  # eps == 0: divide by std per element (_normalizer)
):
    """Statistics, normalize, affine and activation of a chunk of BLOCK_R planes (grid: row
    programs x chunks; one chunk unless the planes are split).

    x_hat = ((x - pivot) * inv_scale - mean) / std, the statistics taken as STATS_FROM says."""
    ACC: tl.constexpr = tl.float64 if x[0].dtype.element_ty == tl.float64 else tl.float32
    # Chunks need partials only for statistics; the eval pass is elementwise, so a split grid
    # just gives each program its chunk.
    CHUNKED: tl.constexpr = (STATS_FROM == FROM_PARTIALS) | (STATS_FROM == FROM_RUNNING)
    # The normalize sweep after a statistics sweep walks the tiles backwards: the ones read last
    # are the likeliest to be in L2 still.
    REVERSE: tl.constexpr = STATS_FROM == FROM_LOOP
    num_planes, C, HW, _ = geometry
    rows, plane, mask = _program_planes(geometry, BLOCK_R)
    nc = _plane_nc(plane, C)
    span, chunk0 = _chunk_range(HW, mask, BLOCK_HW, BLOCK_R, CHUNKED)
    x_planes = _plane_start(x, rows)
    hw = tl.full([BLOCK_R], HW, ACC)

    # ---- statistics: (pivot, inv_scale, mean of a, var of a), a = (x - pivot) * inv_scale ----
    if STATS_FROM == FROM_RUNNING:
        running_mean, running_var = _load_running(running, nc[1], mask, ACC)
        stats = (running_mean, tl.full([BLOCK_R], 1.0, ACC), tl.zeros([BLOCK_R], dtype=ACC),
                 running_var)
    elif STATS_FROM == FROM_PARTIALS:
        stats = _load_stats(Stats, num_planes, plane, mask)
    elif STATS_FROM == FROM_TILE:  # x read once, kept in registers for y
        pivot = _load_pivot(x_planes, mask, ACC)
        tile = _tile(0, mask, HW, BLOCK_HW,
                     segment(BLOCK_HW, x[0].dtype.element_ty.primitive_bitwidth))
        xt = _load_rows(x_planes, tile)
        stats = _tile_stats(_widen(xt, ACC), _tile_mask(tile), pivot, tl.cast(HW, ACC), mask,
                            x[0], ACC)
    else:  # FROM_LOOP: the statistics sweep
        pivot, mean, m2, inv_scale = _safe_streamed_moments(
            x_planes, mask, span, _load_pivot(x_planes, mask, ACC), x[0], ACC, BLOCK_R, BLOCK_HW)
        stats = (pivot, inv_scale, mean, _div(m2, hw))
    if Stats is not None:
        if STATS_FROM != FROM_PARTIALS:
            _store_stats(Stats, num_planes, plane, chunk0, stats)
    _, inv_scale, _, var = stats
    std = _std(var, inv_scale, _host_float(eps, ACC), STATS_FROM != FROM_RUNNING)

    # ---- normalize, affine, activation --------------------------------------------------------
    if y is not None:
        y_planes = _plane_start(y, rows)
        if r is not None:
            r_planes = _plane_start(r, rows)
        else:
            r_planes = None
        affine = (_load_param(w, nc, mask, 1.0, ACC, BLOCK_R),
                  _load_param(b, nc, mask, 0.0, ACC, BLOCK_R))
        normalizer = _normalizer(stats, std, affine, EXACT)
        negative_slope = _host_float(slope, ACC)
        if STATS_FROM == FROM_TILE:  # x is still in registers
            _write_y(y_planes, r_planes, tile, xt, normalizer, negative_slope, ACTIVATION, EXACT)
        else:
            for t in range(span[0], span[1], BLOCK_HW):
                tile = _tile(_swept_tile(t, span, REVERSE, BLOCK_HW), mask, span[1], BLOCK_HW,
                             BLOCK_HW)
                _write_y(y_planes, r_planes, tile, _load_rows(x_planes, tile), normalizer,
                         negative_slope, ACTIVATION, EXACT)


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
    # Averaged term by term: a sum over n of variances near the top of the range would overflow.
    mean_avg = tl.zeros([BLOCK_C], dtype=ACC)
    var_avg = tl.zeros([BLOCK_C], dtype=ACC)
    for n in range(0, N):  # fixed order: deterministic
        pivot, inv_scale, mean, var = _load_stats(Stats, num_planes, plane, mask)
        mean_avg += (pivot + mean / inv_scale) / N
        # Divided twice: inv_scale^2 leaves float32's normal range from a spread of ~1e19 (and
        # is 0 from ~4e22) while the variance itself can still be finite.
        var_avg += var / inv_scale / inv_scale / N
        plane += C
    m = _host_float(momentum, ACC)
    hw = tl.full([BLOCK_C], HW, ACC)
    running_mean, running_var = _load_running(running, c, mask, ACC)
    running_mean = (1.0 - m) * running_mean + m * mean_avg
    running_var = (1.0 - m) * running_var + m * (var_avg * (hw / (hw - 1.0)))  # unbiased, as torch
    mean_pointer, mean_stride, var_pointer, var_stride = running
    _store_running(mean_pointer, c, mean_stride, running_mean, mask)
    _store_running(var_pointer, c, var_stride, running_var, mask)
