"""The per-plane statistics (the math, and how K is chosen: the package docstring): a plane
held in one tile (``_tile_stats``), streamed in tiles (``_safe_streamed_moments``), or split in
chunks (``_chunk_summary`` per chunk, ``_combine_chunks`` per plane). Every reduction is a
corrected two-pass one or Chan's parallel combination, never a difference of large sums, and
every merge runs in a fixed order (deterministic).
"""

import triton
import triton.language as tl

from .common import _cold_path, _div, _sqrt, _tile

# max |x - reference| above this switches on the overflow-safe scaling of the deltas: below it,
# d^2 summed over 2^31 elements stays far inside float32's range.
BIG_DELTA = tl.constexpr(1099511627776.0)  # 2**40


@triton.jit
def _load_pivot(x_planes, mask, ACC: tl.constexpr):
    """K = x[plane, 0]: what the saved mean of a plane is relative to (in every chunk)."""
    return tl.load(x_planes[0], mask=mask, other=0.0).to(ACC)


@triton.jit
def _inverse_scale(max_delta, ACC: tl.constexpr):
    """1 / max|d| where d^2 could overflow, else exactly 1 (the math then runs unscaled)."""
    return tl.where(max_delta > BIG_DELTA, 1.0 / tl.maximum(max_delta, BIG_DELTA), 1.0).to(ACC)


@triton.jit
def _two_sum_error(a, b, s):
    """a + b - s exactly, for s = fl(a + b) (Knuth's TwoSum): sums and differences only, so FMA
    contraction cannot change it."""
    back = s - a
    return (a - (s - back)) + (b - back)


@triton.jit
def _move_center(center, mean, inv_scale):
    """(center, mean) -> (fl(center + mean / inv_scale), the rest of the mean, in units of a):
    the same mean, split so that its large part is exact (TwoSum) and its small part small."""
    shift = _div(mean, inv_scale)  # exact when inv_scale == 1
    moved = center + shift
    rest = mean - shift * inv_scale  # 0 when inv_scale == 1
    return moved, _two_sum_error(center, shift, moved) * inv_scale + rest


@triton.jit
def _two_pass(a, tile_mask, count):
    """(mean, a - mean) of one tile in registers, ``count`` valid lanes per plane (0 on the
    others): the first step of an exact two-pass reduction. The division rounds correctly."""
    mean = _div(tl.sum(a, axis=1), count)
    return mean, tl.where(tile_mask, a - mean[:, None], 0.0)


@triton.jit
def _tile_stats(delta, tile_mask, pivot, count, ACC: tl.constexpr):
    """(K, inv_scale, mean, var) of a plane held in one tile, ``delta = x - pivot`` (0 on masked
    lanes): the statistics the Stats rows hold.

    ``x - K`` rounds at the scale of |x - K|: where the pivot lies more than 2 standard
    deviations from the mean (an outlier at x[plane, 0]) K moves to the mean (``_move_center``),
    so that normalizing keeps the precision a normalization about the mean has. Elsewhere
    K = pivot, bit for bit: constant planes and 2-element planes stay exact.

    Exact with or without FMA contraction (compiled code fuses a * b + c, as the sm_90 PTX shows
    in the sums, the centering, M2, std and the affine; the interpreter never does): for those
    planes inv_scale is exactly 1, so a fused product is the rounded one; a constant plane's
    products have a zero factor; and a symmetric plane's c * c + fl(c * c), fused, still rounds
    to 2 fl(c * c), its error being a quarter ulp of the result."""
    inv_scale = _inverse_scale(tl.max(tl.abs(delta), axis=1), ACC)
    mean, centered = _two_pass(delta * inv_scale[:, None], tile_mask, count)
    # The corrected two-pass algorithm: the deviations' sum corrects the mean for the rounding of
    # the first sum (which is large when the pivot is far out) and M2 with it. A symmetric plane's
    # deviations sum to exactly 0: 2-element planes stay exact.
    correction = _div(tl.sum(centered, axis=1), count)
    m2 = tl.sum(centered * centered, axis=1) - correction * correction * count
    var = _div(tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL), count)
    moved, rest = _move_center(pivot, mean, inv_scale)
    far = mean * mean > 4.0 * var  # False for NaN statistics: the plane stays NaN
    return tl.where(far, moved, pivot), inv_scale, tl.where(far, rest, mean) + correction, var


@triton.jit
def _merge_moments(total, part):
    """Chan's parallel formula: (count, mean, M2 added) of two disjoint sets, ``total`` =
    (count, mean) of the first, ``part`` = (count, mean, M2) of the second, both about the same
    reference; the M2 of the union is the first's plus what is returned. A difference of means
    and non-negative terms: stable."""
    n_a, mean_a = total
    n_b, mean_b, m2_b = part
    n = n_a + n_b
    weight_b = _div(n_b, n)
    delta = mean_b - mean_a
    return n, mean_a + delta * weight_b, m2_b + delta * delta * (n_a * weight_b)


@triton.jit
def _streamed_moments(x_planes, mask, span, pivot, inv_scale, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Over ``span = (start, end)`` of each plane, in tiles: (center, mean, M2) of a = (x -
    center) * inv_scale, the center at the mean, and max |x - reference| (to detect the rare
    planes whose squares could overflow).

    The first tile moves the reference from the pivot to its own mean, so that a distant pivot
    (an outlier at x[plane, 0]) does not make every delta large. Each tile's mean and M2 are
    then taken in registers, exactly (two passes over the registers), and merged into the
    running ones with Chan's parallel formula in tile order; M2 is summed compensated (TwoSum),
    so that its error does not grow with the number of tiles."""
    x_start, x_stride = x_planes
    start, end = span
    reference = pivot
    count = tl.zeros([], dtype=ACC)  # the same for every plane of the program
    mean = tl.zeros([BLOCK_R], dtype=ACC)
    m2 = tl.zeros([BLOCK_R], dtype=ACC)
    m2_error = tl.zeros([BLOCK_R], dtype=ACC)  # M2 = m2 + m2_error
    max_delta = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    for t in range(start, end, BLOCK_HW):
        offs, tile_mask = _tile(t, mask, end, BLOCK_HW)
        xt = tl.load(x_start[:, None] + offs[None, :] * x_stride, mask=tile_mask, other=0.0)
        xt = xt.to(ACC)
        tile_count = tl.minimum(end - t, BLOCK_HW).to(ACC)
        if t == start:  # terms divided first: no overflow where x - pivot is near the top
            share = tl.where(tile_mask, (xt - pivot[:, None]) * (1.0 / tile_count), 0.0)
            reference = pivot + tl.sum(share, axis=1)
        delta = tl.where(tile_mask, xt - reference[:, None], 0.0)
        tile_mean, centered = _two_pass(delta * inv_scale[:, None], tile_mask, tile_count)
        count, mean, added = _merge_moments(
            (count, mean), (tile_count, tile_mean, tl.sum(centered * centered, axis=1)))
        total = m2 + added
        m2_error += _two_sum_error(m2, added, total)
        m2 = total
        max_delta = tl.maximum(max_delta, tl.abs(delta))
    center, rest = _move_center(reference, mean, inv_scale)
    return (center, rest, m2 + m2_error), tl.max(max_delta, axis=1)


@triton.jit
def _safe_streamed_moments(x_planes, mask, span, pivot, base, ACC: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """_streamed_moments with the overflow guard: (center, mean, M2, inv_scale). Ordinary data
    takes one sweep; a plane with max |x - reference| > 2^40 is swept again with its deltas
    scaled (a cold branch). ``base``: an element the cold path's mark may read."""
    inv_scale = tl.full([BLOCK_R], 1.0, ACC)
    moments, max_delta = _streamed_moments(x_planes, mask, span, pivot, inv_scale, ACC, BLOCK_R,
                                           BLOCK_HW)
    if tl.max(tl.where(mask, max_delta, 0.0), axis=0) > BIG_DELTA:
        _cold_path(base)
        inv_scale = _inverse_scale(max_delta, ACC)
        moments, max_delta = _streamed_moments(x_planes, mask, span, pivot, inv_scale, ACC,
                                               BLOCK_R, BLOCK_HW)
    center, mean, m2 = moments
    return center, mean, m2, inv_scale


@triton.jit
def _chunk_summary(center, mean, m2, count, inv_scale):
    """What a split plane's chunk hands to the combine pass, in units of x: its mean as an
    unevaluated sum hi + lo (hi = fl(mean), lo exact with inv_scale == 1) and its RMS deviation
    sqrt(M2 / count); each finite wherever x is."""
    hi, rest = _move_center(center, mean, inv_scale)
    return hi, _div(rest, inv_scale), _div(_sqrt(_div(m2, count)), inv_scale)


@triton.jit
def _combine_chunks(summaries, sizes, hw, ACC: tl.constexpr):
    """(K, inv_scale, mean, var) of split planes from their chunks' ``summaries`` (hi, lo, RMS:
    [planes, chunks] tiles; ``sizes`` = (counts, counts / HW), [1, chunks], 0 past the last
    chunk; ``hw`` per plane): Chan's parallel formula in its two-pass form, in a fixed order.
    The chunks' deviations from chunk 0's mean, (hi - hi_0) + lo, give the mean and, with their
    RMS, M2 = sum over chunks of count * (RMS^2 + deviation^2) - HW * mean^2; then K moves from
    hi_0 to the mean rounded to ACC (``_move_center``). A constant plane gets exactly K = its
    value and mean = var = 0."""
    his, los, rms = summaries
    counts, weights = sizes
    first = tl.sum(tl.where(tl.arange(0, his.shape[1])[None, :] == 0, his, 0.0), axis=1)
    deviations = tl.where(counts > 0, (his - first[:, None]) + los, 0.0)
    inv_scale = _inverse_scale(tl.max(tl.maximum(rms, tl.abs(deviations)), axis=1), ACC)
    deviations = deviations * inv_scale[:, None]
    rms = rms * inv_scale[:, None]
    mean = tl.sum(weights * deviations, axis=1)
    m2 = tl.sum(counts * (rms * rms + deviations * deviations), axis=1) - mean * mean * hw
    var = _div(tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL), hw)
    center, rest = _move_center(first, mean, inv_scale)
    return center, inv_scale, rest, var
