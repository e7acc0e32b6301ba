"""The per-plane statistics (the math, and how the pivot is chosen: the package docstring): a plane
held in one tile (``_tile_stats``), streamed in tiles (``_safe_streamed_moments``), or split in
chunks (``_chunk_summary`` per chunk, ``_combine_chunks`` per plane). Every reduction is a
corrected two-pass one, Welford's update or Chan's parallel combination, never a difference of
large sums, and every merge runs in a fixed order (deterministic).

What a pass pays per element is what keeps it memory-bound (perf/sass.py counts it from the
compiled code): the statistics of a tile take two reductions across the CTA (the sum of the
deltas, then the deviations' sum and sum of squares together); a stream keeps each lane's
running statistics in registers, merged per tile without a reduction across lanes, and combines
the lanes once at its end. The overflow guard costs ordinary data
nothing: its sums come out finite, and only a program with a plane whose sums do not is redone
with the deltas scaled (a branch marked ``_cold_path``).
"""

import triton
import triton.language as tl

from .common import (
    _INTERPRETED, _cold_path, _div, _load_block, _load_rows, _sqrt, _tile, _tile_mask,
    _whole_tile, _widen,
)

# max |x - pivot| above this switches on the overflow-safe scaling of the deltas: below it,
# d^2 summed over 2^31 elements stays far inside float32's range.
BIG_DELTA = tl.constexpr(1099511627776.0)  # 2**40


@triton.jit
def _load_pivot(x_planes, mask, ACC: tl.constexpr):
    """The first pivot, x[plane, 0]: what the saved mean of a plane is relative to (in every
    chunk), unless it moves."""
    return tl.load(x_planes[0], mask=mask, other=0.0).to(ACC)


@triton.jit
def _inverse_scale(max_delta, ACC: tl.constexpr):
    """1 / max|d| where d^2 could overflow, else exactly 1 (the math then runs unscaled)."""
    return tl.where(max_delta > BIG_DELTA, 1.0 / tl.maximum(max_delta, BIG_DELTA), 1.0).to(ACC)


@triton.jit
def _overflowed(mean, m2, mask):
    """True if any plane's sums left the finite range (an overflow, or inf / NaN in the data):
    the program then redoes its statistics scaled. One value for the whole program."""
    bad = mask & ~((tl.abs(mean) + m2) < float("inf"))
    return tl.max(bad.to(tl.int32), axis=0) > 0


@triton.jit
def _two_sum_error(a, b, s):
    """a + b - s exactly, for s = fl(a + b) (Knuth's TwoSum): sums and differences only, so FMA
    contraction cannot change it."""
    back = s - a
    return (a - (s - back)) + (b - back)


@triton.jit
def _move_pivot(pivot, mean, inv_scale):
    """(pivot, mean) -> (fl(pivot + mean / inv_scale), the rest of the mean, in units of a):
    the pivot moved to the mean, which is split so that its large part is exact (TwoSum) and
    its small part small. ``inv_scale`` None: unscaled."""
    if inv_scale is None:
        new_pivot = pivot + mean
        return new_pivot, _two_sum_error(pivot, mean, new_pivot)
    else:
        step = _div(mean, inv_scale)  # exact when inv_scale == 1
        new_pivot = pivot + step
        rest = mean - step * inv_scale  # 0 when inv_scale == 1
        return new_pivot, _two_sum_error(pivot, step, new_pivot) * inv_scale + rest


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _row_sums(a, b):
    """(sum of a, sum of b) along axis 1, in one reduction tree: one round of shuffles and
    barriers where two tl.sum make two. The interpreter folds a custom reduction one element
    after the other, so it takes two tl.sum there (summed pairwise, as a GPU's tree does)."""
    if _INTERPRETED:
        return tl.sum(a, axis=1), tl.sum(b, axis=1)
    else:
        return tl.reduce((a, b), 1, _add_pairs)


@triton.jit
def _tile_moments(xt, tile_mask, pivot, inv_scale, count):
    """(mean, correction, M2) of a = (x - pivot) * inv_scale (no scaling for None) over a tile
    in registers, ``count`` valid lanes in each plane (a scalar): the corrected two-pass
    algorithm. The mean is ``mean + correction``: the deviations' sum corrects the rounding of
    the first sum and of its quotient (large when the pivot is far out), and M2 with it, so that
    a reciprocal multiplied is as good as a division. Two reductions across the CTA, the second
    one tree for both sums."""
    a = xt - pivot[:, None]
    if inv_scale is not None:
        a = a * inv_scale[:, None]
    a = tl.where(tile_mask, a, 0.0)
    inv_count = 1.0 / count
    mean = tl.sum(a, axis=1) * inv_count
    centered = tl.where(tile_mask, a - mean[:, None], 0.0)
    deviations, squares = _row_sums(centered, centered * centered)
    correction = deviations * inv_count
    return mean, correction, squares - correction * deviations


@triton.jit
def _tile_summary(pivot, moments, inv_scale, count, ACC: tl.constexpr):
    """(pivot, inv_scale, mean, var) from a tile's (mean, correction, M2) (``_tile_stats``)."""
    mean, correction, m2 = moments
    var = _div(tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL),
               tl.full(mean.shape, count, ACC))
    mean_pivot, rest = _move_pivot(pivot, mean, inv_scale)
    far = mean * mean > 4.0 * var  # False for NaN statistics: the plane stays NaN
    if inv_scale is None:
        inv_scale = tl.full(mean.shape, 1.0, ACC)
    return tl.where(far, mean_pivot, pivot), inv_scale, tl.where(far, rest, mean) + correction, var


@triton.jit
def _tile_stats(xt, tile_mask, pivot, count, mask, base, ACC: tl.constexpr):
    """(pivot, inv_scale, mean, var) of a plane held in one tile ``xt`` (in ACC), ``count``
    elements in each plane: the statistics the Stats fields hold. ``base``: an element the cold
    path's mark may read.

    ``x - pivot`` rounds at the scale of |x - pivot|: where the first pivot (x[plane, 0]) lies
    more than 2 standard deviations from the mean (an outlier) the pivot moves to the mean
    (``_move_pivot``), so that normalizing keeps the precision a normalization about the mean
    has. Elsewhere it stays x[plane, 0], bit for bit: constant planes and 2-element planes stay
    exact.

    Exact with or without FMA contraction (compiled code fuses a * b + c, as the sm_90 PTX shows
    in the sums, the centering, M2 and the affine; the interpreter never does): for those planes
    nothing is scaled; a constant plane's products have a zero factor; and a symmetric plane's
    c * c + fl(c * c), fused, still rounds to 2 fl(c * c), its error being a quarter ulp of the
    result. Ordinary data computes unscaled throughout; only a program with a plane whose sums
    overflow takes the branch that redoes it scaled."""
    moments = _tile_moments(xt, tile_mask, pivot, None, count)
    stats = _tile_summary(pivot, moments, None, count, ACC)
    mean, _, m2 = moments
    if _overflowed(mean, m2, mask):
        _cold_path(base)
        bad = ~((tl.abs(mean) + m2) < float("inf"))
        scale = _inverse_scale(
            tl.max(tl.where(tile_mask, tl.abs(xt - pivot[:, None]), 0.0), axis=1), ACC)
        scaled = _tile_summary(pivot, _tile_moments(xt, tile_mask, pivot, scale, count), scale,
                               count, ACC)
        stats = (tl.where(bad, scaled[0], stats[0]), tl.where(bad, scaled[1], stats[1]),
                 tl.where(bad, scaled[2], stats[2]), tl.where(bad, scaled[3], stats[3]))
    return stats


# The segments a streamed tile is taken in (``_streamed_moments``): each lane holds its positions'
# 4 values in registers, as long as a tile's quarter spans every lane of the CTA, which the
# stream's tiles do (heuristics.LANE_ELEMENTS: 32 elements, 4 16-byte vectors, per lane).
STREAM_SEGMENTS = tl.constexpr(4)


@triton.jit
def _merge_moments(total, part):
    """Chan's parallel formula: (count, mean, M2 added) of two disjoint sets, ``total`` =
    (count, mean) of the first, ``part`` = (count, mean) of the second, both about the same
    pivot; the M2 of the union is the first's plus the second's plus what is returned. A
    difference of means and non-negative terms: stable."""
    n_a, mean_a = total
    n_b, mean_b = part
    n = n_a + n_b
    weight_b = _div(n_b, n)
    delta = mean_b - mean_a
    return n, mean_a + delta * weight_b, delta * delta * (n_a * weight_b)


@triton.jit
def _segment_moments(block, valid, pivot, inv_scale, ACC: tl.constexpr):
    """(count, mean, M2) of a = (x - pivot) * inv_scale (no scaling for None) over the segments
    of a (segments, planes, SEG) block of x, for each (plane, position): a two-pass within each
    lane's registers, no reduction across lanes. ``valid``: the block's mask, None for a block
    with every element in its plane (its count is then the same for all). The mean is the sum
    times a reciprocal: M2 about a mean off by an ulp grows by the square of that ulp, and the
    lanes' combination corrects the mean (``_combine_lanes``)."""
    a = _widen(block, ACC) - pivot[None, :, None]
    if inv_scale is not None:
        a = a * inv_scale[None, :, None]
    if valid is None:
        count = tl.full([], block.shape[0], ACC)
        mean = tl.sum(a, axis=0) * (1.0 / block.shape[0])
        centered = a - mean[None, :, :]
    else:
        a = tl.where(valid, a, 0.0)
        count = tl.sum(valid.to(ACC), axis=0)
        mean = tl.sum(a, axis=0) * (1.0 / tl.maximum(count, 1.0))
        centered = tl.where(valid, a - mean[None, :, :], 0.0)
    return count, mean, tl.sum(centered * centered, axis=0)


@triton.jit
def _block_mean(block, valid, count, pivot, inv_scale, ACC: tl.constexpr):
    """Per plane, the mean of a = (x - pivot) * inv_scale (no scaling for None) over a (segments,
    planes, SEG) block of x (``valid``: its mask, None for a whole block; ``count`` valid elements
    per plane): what moves the stream's pivot from its first tile."""
    a = _widen(block, ACC) - pivot[None, :, None]
    if valid is not None:
        a = tl.where(valid, a, 0.0)
    if inv_scale is not None:
        a = a * inv_scale[None, :, None]
    return tl.sum(tl.sum(a, axis=0), axis=1) * (1.0 / count)


@triton.jit
def _streamed_moments(x_planes, mask, span, pivot, inv_scale, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Over ``span = (start, end)`` of each plane, in tiles: (pivot, mean, M2) of a = (x -
    pivot) * inv_scale (no scaling for None), the pivot a float near the data.

    Every lane keeps running statistics (count, mean, M2) of the positions it holds, in
    registers: a tile is taken as STREAM_SEGMENTS segments, each lane's values of a position
    reduced by a two-pass in its registers (``_segment_moments``) and merged into its running
    statistics by Chan's formula, so that the loop reduces nothing across lanes. Whole tiles
    take no mask per element; the last, partial one is taken after the loop, with its lanes'
    counts. The lanes' statistics are combined once at the end, by Chan's formula in its
    corrected two-pass form (``_combine_lanes``). Nothing is a difference of large sums, and no
    error grows with the number of tiles but the rounding of sums of non-negative terms.

    The first tile, loaded before the loop, moves the pivot from the first one to its mean
    first, so that a distant first pivot (an outlier at x[plane, 0]) does not make every delta
    large (the partial tile does, when there is no whole one); each iteration then loads the
    tile the next one takes."""
    SEG: tl.constexpr = BLOCK_HW // STREAM_SEGMENTS
    start, end = span
    whole_end = end - (end - start) % BLOCK_HW  # past the last whole tile
    # Whole tiles are loaded under their planes' mask and one flag for the tile (no comparison
    # per element); the first one, if there is one, moves the pivot.
    block = _load_block(x_planes, _whole_tile(start, tl.where(start < whole_end, mask, False),
                                              BLOCK_HW, SEG))
    first_mean = _block_mean(block, None, BLOCK_HW, pivot, inv_scale, ACC)
    pivot, _ = _move_pivot(pivot, tl.where(start < whole_end, first_mean, 0.0), inv_scale)
    count = tl.zeros([], dtype=ACC)  # per position, the same for all: whole tiles only
    mean = tl.zeros([BLOCK_R, SEG], dtype=ACC)
    m2 = tl.zeros([BLOCK_R, SEG], dtype=ACC)
    for t in range(start, whole_end, BLOCK_HW):
        part_count, part_mean, part_m2 = _segment_moments(block, None, pivot, inv_scale, ACC)
        count, mean, added = _merge_moments((count, mean), (part_count, part_mean))
        m2 += part_m2 + added
        next_t = t + BLOCK_HW
        block = _load_block(x_planes, _whole_tile(next_t, tl.where(next_t < whole_end, mask, False),
                                                  BLOCK_HW, SEG))
    partial = (tl.zeros([BLOCK_R, SEG], dtype=ACC), tl.zeros([BLOCK_R, SEG], dtype=ACC),
               tl.zeros([BLOCK_R, SEG], dtype=ACC))
    if whole_end < end:  # the partial tile: its own lanes' statistics
        tile = _tile(whole_end, mask, end, BLOCK_HW, SEG)
        block = _load_block(x_planes, tile)
        if start == whole_end:  # no whole tile: this one moves the pivot
            pivot, _ = _move_pivot(
                pivot, _block_mean(block, tile[1], end - start, pivot, inv_scale, ACC), inv_scale)
        partial = _segment_moments(block, tile[1], pivot, inv_scale, ACC)
    mean, m2 = _combine_lanes((count, mean, m2), partial, tl.maximum(end - start, 1).to(ACC))
    return pivot, mean, m2


@triton.jit
def _combine_lanes(whole, partial, total):
    """(mean, M2) of each plane from its lanes' (count, mean, M2) over the whole tiles
    (``whole``: the count a scalar) and over the partial tile ([planes, positions] tiles),
    ``total`` elements in each plane: Chan's formula in its corrected two-pass form (the
    deviations' sum corrects the mean and M2), two reductions across the CTA."""
    count, means, m2s = whole
    partial_counts, partial_means, partial_m2s = partial
    inv_total = 1.0 / total
    mean = tl.sum(count * means + partial_counts * partial_means, axis=1) * inv_total
    deviation = means - mean[:, None]
    partial_deviation = partial_means - mean[:, None]
    deviations, squares = _row_sums(
        count * deviation + partial_counts * partial_deviation,
        (m2s + count * deviation * deviation)
        + (partial_m2s + partial_counts * partial_deviation * partial_deviation))
    correction = deviations * inv_total
    return mean + correction, squares - correction * deviations


@triton.jit
def _safe_streamed_moments(x_planes, mask, span, pivot, base, ACC: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """_streamed_moments with the overflow guard, each plane's pivot moved to its mean:
    (pivot, mean, M2, inv_scale). Ordinary data takes one sweep; a program with a plane whose
    sums leave the finite range sweeps again to find max |x - pivot|, then once more with those
    planes' deltas scaled (a cold branch). ``base``: an element the cold path's mark may read."""
    stream_pivot, mean, m2 = _streamed_moments(x_planes, mask, span, pivot, None, ACC, BLOCK_R,
                                            BLOCK_HW)
    mean_pivot, rest = _move_pivot(stream_pivot, mean, None)
    inv_scale = tl.full([BLOCK_R], 1.0, ACC)
    if _overflowed(mean, m2, mask):
        _cold_path(base)
        bad = ~((tl.abs(mean) + m2) < float("inf"))
        start, end = span
        max_delta = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
        for t in range(start, end, BLOCK_HW):
            tile = _tile(t, mask, end, BLOCK_HW, BLOCK_HW)
            xt = _load_rows(x_planes, tile)
            max_delta = tl.maximum(max_delta, tl.where(_tile_mask(tile),
                                                       tl.abs(xt.to(ACC) - pivot[:, None]), 0.0))
        scale = _inverse_scale(tl.max(max_delta, axis=1), ACC)
        scaled_pivot, scaled_mean, scaled_m2 = _streamed_moments(
            x_planes, mask, span, pivot, scale, ACC, BLOCK_R, BLOCK_HW)
        scaled_mean_pivot, scaled_rest = _move_pivot(scaled_pivot, scaled_mean, scale)
        mean_pivot = tl.where(bad, scaled_mean_pivot, mean_pivot)
        rest = tl.where(bad, scaled_rest, rest)
        m2 = tl.where(bad, scaled_m2, m2)
        inv_scale = tl.where(bad, scale, inv_scale)
    return mean_pivot, rest, m2, inv_scale


@triton.jit
def _chunk_summary(pivot, rest, var, inv_scale, mask, base):
    """What a split plane's chunk hands to the combine pass, in units of x: its mean ``pivot +
    rest / inv_scale`` as an unevaluated sum hi + lo, hi = fl(mean) and lo the rest (TwoSum),
    and its RMS deviation sqrt(``var``) / inv_scale, each finite wherever x is. Unscaled planes
    divide by nothing (a program with a scaled plane takes a cold branch)."""
    hi, lo = _move_pivot(pivot, rest, None)
    rms = _sqrt(var)
    if tl.max(tl.where(mask, inv_scale != 1.0, False).to(tl.int32), axis=0) > 0:
        _cold_path(base)
        scaled = inv_scale != 1.0
        scaled_hi, scaled_lo = _move_pivot(pivot, rest, inv_scale)
        hi = tl.where(scaled, scaled_hi, hi)
        lo = tl.where(scaled, _div(scaled_lo, inv_scale), lo)
        rms = _div(rms, inv_scale)
    return hi, lo, rms


@triton.jit
def _combine_chunks(summaries, sizes, hw, ACC: tl.constexpr):
    """(pivot, inv_scale, mean, var) of split planes from their chunks' ``summaries`` (hi, lo, RMS:
    [planes, chunks] tiles; ``sizes`` = (counts, counts / HW), [1, chunks], 0 past the last
    chunk; ``hw`` per plane): Chan's parallel formula in its two-pass form, in a fixed order.
    The chunks' deviations from chunk 0's mean, (hi - hi_0) + lo, give the mean and, with their
    RMS, M2 = sum over chunks of count * (RMS^2 + deviation^2) - HW * mean^2; then the pivot
    moves from hi_0 to the mean rounded to ACC (``_move_pivot``). A constant plane gets exactly
    pivot = its value and mean = var = 0."""
    his, los, rms = summaries
    counts, weights = sizes
    pivot0 = tl.sum(tl.where(tl.arange(0, his.shape[1])[None, :] == 0, his, 0.0), axis=1)
    deviations = tl.where(counts > 0, (his - pivot0[:, None]) + los, 0.0)
    inv_scale = _inverse_scale(tl.max(tl.maximum(rms, tl.abs(deviations)), axis=1), ACC)
    deviations = deviations * inv_scale[:, None]
    rms = rms * inv_scale[:, None]
    mean = tl.sum(weights * deviations, axis=1)
    m2 = tl.sum(counts * (rms * rms + deviations * deviations), axis=1) - mean * mean * hw
    var = _div(tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL), hw)
    pivot, rest = _move_pivot(pivot0, mean, inv_scale)
    return pivot, inv_scale, rest, var
