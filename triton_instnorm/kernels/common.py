"""Building blocks shared by the forward and backward kernels (the math: the package docstring).

Tensors reach the kernels as *views*: tuples that carry a pointer with the strides it is read
through, so a tensor can never be read with another tensor's strides.

    planes view   (pointer, group stride, row stride, spatial stride): x, y, dy, dx
    param view    (pointer, n stride, c stride): weight / bias, or adaptive scale / shift
    running view  (running_mean, its stride, running_var, its stride)
    geometry      (N * C planes, C, HW, rows per group)

Element (group g, row r, spatial s) of a planes view is at ``g * group stride + r * row stride +
s * spatial stride``; plane (n, c) is row ``g * rows_per_group + r = n * C + c``. Contiguous NCHW
folds the batch into one group (rows_per_group = N * C, row stride HW, spatial stride 1);
channels_last keeps a group per sample (rows_per_group = C, row stride 1, spatial stride C).
"""

import triton
import triton.language as tl

from . import constants as k

# The constants shared with the host (constants.py). Globals read by @triton.jit code must be
# tl.constexpr instances (an annotation is not enough).
ACT_NONE = tl.constexpr(k.ACT_NONE)
ACT_RELU = tl.constexpr(k.ACT_RELU)
ACT_LEAKY_RELU = tl.constexpr(k.ACT_LEAKY_RELU)
ACT_SILU = tl.constexpr(k.ACT_SILU)
ACT_GELU = tl.constexpr(k.ACT_GELU)
FROM_TILE = tl.constexpr(k.FROM_TILE)
FROM_PLANE = tl.constexpr(k.FROM_PLANE)
FROM_PARTIALS = tl.constexpr(k.FROM_PARTIALS)
FROM_RUNNING = tl.constexpr(k.FROM_RUNNING)
PIVOT = tl.constexpr(k.PIVOT)
INV_SCALE = tl.constexpr(k.INV_SCALE)
MEAN = tl.constexpr(k.MEAN)
VAR = tl.constexpr(k.VAR)
SUM = tl.constexpr(k.SUM)
SUM_SQ = tl.constexpr(k.SUM_SQ)
SCALE = tl.constexpr(k.SCALE)
SUM_DZ_XHAT = tl.constexpr(k.SUM_DZ_XHAT)
SUM_DZ = tl.constexpr(k.SUM_DZ)
SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), in the exact GELU's erf
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # the standard normal density at 0

# max |x - pivot| above this switches on the overflow-safe scaling of the deltas: below it,
# d^2 summed over 2^24 elements stays far inside float32's range.
BIG_DELTA = tl.constexpr(1099511627776.0)  # 2**40


@triton.jit
def _activate(z, slope, ACTIVATION: tl.constexpr):
    if ACTIVATION == ACT_RELU:
        z = tl.where(z <= 0, 0.0, z)  # not (z > 0, z, 0): NaN stays NaN, as torch.relu
    elif ACTIVATION == ACT_LEAKY_RELU:
        z = tl.where(z > 0, z, z * slope)
    elif ACTIVATION == ACT_SILU:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == ACT_GELU:
        z = 0.5 * z * (1.0 + tl.erf(z * SQRT_HALF))
    return z


@triton.jit
def _activation_grad(dy, z, slope, ACTIVATION: tl.constexpr):
    """dy * act'(z), with the same conventions at z == 0 as torch's own backward kernels."""
    if ACTIVATION == ACT_RELU:
        dy = tl.where(z <= 0, 0.0, dy)  # torch's threshold_backward passes dy through at NaN
    elif ACTIVATION == ACT_LEAKY_RELU:
        dy = tl.where(z > 0, dy, dy * slope)
    elif ACTIVATION == ACT_SILU:
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    elif ACTIVATION == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * SQRT_HALF))
        pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        dy = dy * (cdf + z * pdf)
    return dy


@triton.jit
def _div(x, y):
    """Correctly rounded x / y (Triton's float32 `/` is not IEEE): keeps x / x == 1."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.math.sqrt_rn(x)


@triton.jit
def _std(var, inv_scale, eps):
    """sqrt(var of a + eps * inv_scale^2): one expression for the forward and the backward, so
    that both get the same bits."""
    return _sqrt(var + eps * inv_scale * inv_scale)


@triton.jit
def _host_float(pair, ACC: tl.constexpr):
    """A host float passed as a float32 (hi, lo) pair (Triton's float arguments are float32):
    hi + lo carries a float64 eps or momentum to float64 kernels."""
    return tl.cast(pair[0], ACC) + tl.cast(pair[1], ACC)


@triton.jit
def _program_planes(geometry, BLOCK_R: tl.constexpr):
    """The BLOCK_R planes of this program (grid axis 0): (group, row in group, mask, plane
    = n * C + c, n, c), all 64-bit so that offsets never wrap on tensors of 2^31 elements."""
    num_planes, C, HW, rows_per_group = geometry
    pid = tl.program_id(0)
    blocks_per_group = tl.cdiv(rows_per_group, BLOCK_R)
    row_in_group = (pid % blocks_per_group) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = row_in_group < rows_per_group
    group = (pid // blocks_per_group).to(tl.int64)
    row_in_group = row_in_group.to(tl.int64)
    plane = group * rows_per_group + row_in_group
    return group, row_in_group, mask, plane, plane // C, plane % C


@triton.jit
def _plane_block(num_planes, BLOCK_R: tl.constexpr):
    """(plane, mask) of a program over BLOCK_R consecutive planes, for the passes that read only
    per-plane buffers (the combine passes of split planes)."""
    plane = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return plane, plane < num_planes


@triton.jit
def _plane_start(view, group, row_in_group):
    """(pointer to element 0 of each plane, spatial stride) of a planes view."""
    pointer, group_stride, row_stride, spatial_stride = view
    return pointer + group * group_stride + row_in_group * row_stride, spatial_stride


@triton.jit
def _chunk_range(HW, mask, BLOCK_HW: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr):
    """This program's chunk of its planes, grid axis 1 walking the chunks: (chunk, chunks, start,
    end, first), ``first`` masking the planes for which this is chunk 0, the program that writes
    per-plane results. Chunks are tile multiples, derived here the same way in every pass.
    Without ``SPLIT`` (one chunk, known at compile time) the range is the whole plane, in 32
    bits."""
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    if not SPLIT:
        return chunk, chunks, 0, HW, mask
    else:
        chunk_len = tl.cdiv(tl.cdiv(HW, chunks), BLOCK_HW).to(tl.int64) * BLOCK_HW  # no wrap
        start = chunk * chunk_len
        end = tl.minimum(start + chunk_len, HW)
        first = mask & ((tl.zeros([BLOCK_R], dtype=tl.int32) + chunk) == 0)
        return chunk, chunks, start, end, first


@triton.jit
def _tile(t, mask, end, BLOCK_HW: tl.constexpr):
    """Offsets along the plane of the tile starting at ``t``, and its mask (planes x offsets
    before ``end``): padded lanes are never loaded or stored."""
    offs = t + tl.arange(0, BLOCK_HW).to(tl.int64)
    return offs, mask[:, None] & (offs[None, :] < end)


@triton.jit
def _program_channels(N, C, BLOCK_C: tl.constexpr):
    """The channels of a per-channel program over (N, C) buffers: (c, mask, plane of n = 0,
    N * C); planes are then stepped by C in int64 (n * C in int32 wraps from 2^31 planes)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C, c.to(tl.int64), tl.cast(N, tl.int64) * C


@triton.jit
def _load_param(view, n, c, mask, default, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """The value of each plane's (n, c) in a param view; ``default`` when the view is None."""
    if view is None:
        return tl.full([BLOCK_R], default, ACC)
    else:
        pointer, n_stride, c_stride = view
        return tl.load(pointer + n * n_stride + c * c_stride, mask=mask, other=default).to(ACC)


@triton.jit
def _load_running(running, c, mask, ACC: tl.constexpr):
    """(running mean, running var) of each plane's channel."""
    mean_pointer, mean_stride, var_pointer, var_stride = running
    mean = tl.load(mean_pointer + c * mean_stride, mask=mask, other=0.0).to(ACC)
    var = tl.load(var_pointer + c * var_stride, mask=mask, other=1.0).to(ACC)
    return mean, var


@triton.jit
def _row(Buffer, name, num_planes, plane):
    """Pointers to row ``name`` of a (rows, N * C) buffer at each plane (Stats, PlaneSums)."""
    return Buffer + name * tl.cast(num_planes, tl.int64) + plane  # 4 * N * C can wrap int32


@triton.jit
def _load_stats(Stats, num_planes, plane, mask):
    """(pivot, inv_scale, mean, var) of each plane from a Stats buffer."""
    return (tl.load(_row(Stats, PIVOT, num_planes, plane), mask=mask, other=0.0),
            tl.load(_row(Stats, INV_SCALE, num_planes, plane), mask=mask, other=1.0),
            tl.load(_row(Stats, MEAN, num_planes, plane), mask=mask, other=0.0),
            tl.load(_row(Stats, VAR, num_planes, plane), mask=mask, other=1.0))


@triton.jit
def _partial(Partials, name, num_planes, plane, chunk, chunks):
    """Pointers to row ``name`` of a split plane's (rows, N * C, chunks) partials."""
    return Partials + (name * tl.cast(num_planes, tl.int64) + plane) * chunks + chunk


@triton.jit
def _chunk_partials(Partials, name, num_planes, plane, mask, chunks, BLOCK_CHUNKS: tl.constexpr):
    """Row ``name`` of every chunk of each plane, a [BLOCK_R, BLOCK_CHUNKS] tile (0 past the last
    chunk), for a combine pass to reduce in one fixed tree (deterministic)."""
    ks = tl.arange(0, BLOCK_CHUNKS)
    tile_mask = mask[:, None] & (ks[None, :] < chunks)
    pointers = _partial(Partials, name, num_planes, plane[:, None], ks[None, :], chunks)
    return tl.load(pointers, mask=tile_mask, other=0.0)


@triton.jit
def _shifted_sums(x_start, x_stride, mask, start, end, pivot, inv_scale, ACC: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Over [start, end) of each plane: sum(a), sum(a^2) with a = (x - pivot) * inv_scale, and
    max |x - pivot| (to detect the rare planes whose squares could overflow)."""
    sum_a = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    sum_sq = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    max_delta = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    for t in range(start, end, BLOCK_HW):
        offs, tile_mask = _tile(t, mask, end, BLOCK_HW)
        xt = tl.load(x_start[:, None] + offs[None, :] * x_stride, mask=tile_mask, other=0.0)
        delta = tl.where(tile_mask, xt.to(ACC) - pivot[:, None], 0.0)
        a = delta * inv_scale[:, None]
        sum_a += a
        sum_sq += a * a
        max_delta = tl.maximum(max_delta, tl.abs(delta))
    return tl.sum(sum_a, axis=1), tl.sum(sum_sq, axis=1), tl.max(max_delta, axis=1)


@triton.jit
def _safe_shifted_sums(x_start, x_stride, mask, start, end, pivot, ACC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """_shifted_sums with the overflow guard: (sum a, sum a^2, inv_scale). Ordinary data takes
    one sweep; a plane with max |x - pivot| > 2^40 is swept again with its deltas scaled."""
    inv_scale = tl.full([BLOCK_R], 1.0, ACC)
    sum_a, sum_sq, max_delta = _shifted_sums(x_start, x_stride, mask, start, end, pivot,
                                             inv_scale, ACC, BLOCK_R, BLOCK_HW)
    if tl.max(tl.where(mask, max_delta, 0.0), axis=0) > BIG_DELTA:
        inv_scale = _inverse_scale(max_delta, ACC)
        sum_a, sum_sq, max_delta = _shifted_sums(x_start, x_stride, mask, start, end, pivot,
                                                 inv_scale, ACC, BLOCK_R, BLOCK_HW)
    return sum_a, sum_sq, inv_scale


@triton.jit
def _inverse_scale(max_delta, ACC: tl.constexpr):
    """1 / max|d| where d^2 could overflow, else exactly 1 (the math then runs unscaled)."""
    return tl.where(max_delta > BIG_DELTA, 1.0 / tl.maximum(max_delta, BIG_DELTA), 1.0).to(ACC)
