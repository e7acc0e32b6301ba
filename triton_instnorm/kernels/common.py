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
FROM_LOOP = tl.constexpr(k.FROM_LOOP)
FROM_PARTIALS = tl.constexpr(k.FROM_PARTIALS)
FROM_RUNNING = tl.constexpr(k.FROM_RUNNING)
PIVOT = tl.constexpr(k.PIVOT)
INV_SCALE = tl.constexpr(k.INV_SCALE)
MEAN = tl.constexpr(k.MEAN)
VAR = tl.constexpr(k.VAR)
CHUNK_HI = tl.constexpr(k.CHUNK_HI)
CHUNK_LO = tl.constexpr(k.CHUNK_LO)
CHUNK_RMS = tl.constexpr(k.CHUNK_RMS)
SUM_DZ_XHAT = tl.constexpr(k.SUM_DZ_XHAT)
SUM_DZ = tl.constexpr(k.SUM_DZ)
SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), in the exact GELU's erf
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # the standard normal density at 0


@triton.jit
def _cold_path(pointer):
    """Marks the entry of a branch ordinary data never takes, for the instruction audit
    (perf/sass_flow.py): a volatile load of the element at ``pointer`` (a scalar pointer the
    kernel may read), the kernel's only volatile load (``LDG...STRONG.SYS`` in NVIDIA SASS).
    Costs one load when the branch is taken."""
    tl.load(pointer, volatile=True)


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
    """Correctly rounded x / y (Triton's float32 `/` is not IEEE): keeps x / x == 1. Either
    operand may be a scalar."""
    if x.dtype == tl.float64:
        return x / y
    else:
        x, y = tl.broadcast(x, y)
        return tl.math.div_rn(x, y)


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.math.sqrt_rn(x)


@triton.jit
def _std(var, inv_scale, eps, INPUT_STATS: tl.constexpr):
    """sqrt(var of a + eps * inv_scale^2): one expression for the forward and the backward, so
    that both get the same bits. With ``INPUT_STATS`` (statistics of the input, not given ones),
    +inf where that is 0 (var == 0 with eps == 0: a constant plane): then 1 / std = 0, which is
    torch's invstd rule, so x_hat = 0, y = the shift and dx = 0 instead of 0 / 0."""
    std = _sqrt(var + eps * inv_scale * inv_scale)
    if INPUT_STATS:
        std = tl.where(std == 0, float("inf"), std)
    return std


@triton.jit
def _widen(x, ACC: tl.constexpr):
    """``x`` in the accumulation dtype. bfloat16 through its bits, the high half of a float32:
    one instruction per element (a shift or a mask), where the conversion takes two for every
    other one. The interpreter converts directly (it holds bfloat16 as float32)."""
    if x.dtype == tl.bfloat16 and not _INTERPRETED:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True).to(ACC)
    else:
        return x.to(ACC)


@triton.jit
def _host_float(pair, ACC: tl.constexpr):
    """A host float passed as a float32 (hi, lo) pair (Triton's float arguments are float32):
    hi + lo carries a float64 eps or momentum to float64 kernels."""
    return tl.cast(pair[0], ACC) + tl.cast(pair[1], ACC)


@triton.jit
def _program_planes(geometry, BLOCK_R: tl.constexpr):
    """The BLOCK_R planes of this program (grid axis 0): (rows, plane = n * C + c, mask) with
    rows = (group, row in group), what ``_plane_start`` takes; all 64-bit so that offsets never
    wrap on tensors of 2^31 elements."""
    num_planes, C, HW, rows_per_group = geometry
    pid = tl.program_id(0)
    blocks_per_group = tl.cdiv(rows_per_group, BLOCK_R)
    row_in_group = (pid % blocks_per_group) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = row_in_group < rows_per_group
    group = (pid // blocks_per_group).to(tl.int64)
    row_in_group = row_in_group.to(tl.int64)
    return (group, row_in_group), group * rows_per_group + row_in_group, mask


@triton.jit
def _plane_nc(plane, C):
    """(n, c) of each plane: what a param view is indexed by."""
    return plane // C, plane % C


@triton.jit
def _plane_block(num_planes, BLOCK_R: tl.constexpr):
    """(plane, mask) of a program over BLOCK_R consecutive planes, for the passes that read only
    per-plane buffers (the combine passes of split planes)."""
    plane = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return plane, plane < num_planes


@triton.jit
def _plane_start(view, rows):
    """(pointer to element 0 of each plane, spatial stride) of a planes view."""
    pointer, group_stride, row_stride, spatial_stride = view
    group, row_in_group = rows
    return pointer + group * group_stride + row_in_group * row_stride, spatial_stride


@triton.jit
def _chunk_len(HW, chunks, BLOCK_HW: tl.constexpr):
    """Elements of a plane in each of its ``chunks`` chunks (the last may have fewer): whole
    tiles, derived the same way by every pass and the combine."""
    return tl.cdiv(tl.cdiv(HW, chunks), BLOCK_HW).to(tl.int64) * BLOCK_HW  # no wrap


@triton.jit
def _chunk_sizes(HW, chunks, ACC: tl.constexpr, BLOCK_HW: tl.constexpr,
                 BLOCK_CHUNKS: tl.constexpr):
    """(elements, elements / HW) of each chunk of a plane, [1, BLOCK_CHUNKS] in ACC: chunk_len,
    fewer in the last chunk, 0 past it."""
    chunk_len = _chunk_len(HW, chunks, BLOCK_HW)
    ks = tl.arange(0, BLOCK_CHUNKS).to(tl.int64)
    counts = tl.minimum(tl.maximum(HW - ks * chunk_len, 0), chunk_len).to(ACC)
    return counts[None, :], _div(counts, tl.full([BLOCK_CHUNKS], HW, ACC))[None, :]


@triton.jit
def _chunk_range(HW, mask, BLOCK_HW: tl.constexpr, BLOCK_R: tl.constexpr,
                 CHUNKED: tl.constexpr):
    """This program's chunk of its planes, grid axis 1 walking the chunks: ((start, end),
    chunk0), ``chunk0`` masking the planes for which this is chunk 0, the program that writes
    per-plane results. Without ``CHUNKED`` (one chunk, known at compile time) the range is the
    whole plane, in 32 bits."""
    if not CHUNKED:
        return (0, HW), mask
    else:
        chunk = tl.program_id(1)
        chunk_len = _chunk_len(HW, tl.num_programs(1), BLOCK_HW)
        start = chunk * chunk_len
        chunk0 = mask & ((tl.zeros([BLOCK_R], dtype=tl.int32) + chunk) == 0)
        return (start, tl.minimum(start + chunk_len, HW)), chunk0


@triton.constexpr_function
def segment(block_hw, bits):
    """The segment of a tile (``_tile``): the elements of a plane its lanes read side by side.
    A lane reads 16 bytes (``vector`` elements) and holds ~32 elements of a tile
    (heuristics.LANE_ELEMENTS), so a plane is spread over block_hw / 32 lanes: a segment of
    that many vectors keeps each plane within those lanes and a lane within one plane (at most
    a warp's 32 lanes). Planes of 64 elements or fewer take segments of 8: their rows are seldom
    16-byte aligned (7 x 7), and 8 lanes of one element each per plane beat 16 (the compiled
    7 x 7 forward: 54 instructions per element against 63)."""
    vector = 128 // bits
    if block_hw <= 64:
        return min(block_hw, 8)
    return min(32 * vector, max(8, block_hw * vector // 32))


@triton.jit
def _tile(t, mask, end, BLOCK_HW: tl.constexpr, SEG: tl.constexpr):
    """The tile of BLOCK_HW elements of each plane starting at ``t``, as a (segments, planes,
    SEG) block: (offsets, mask); masked lanes (past ``end``, planes out of range) are never
    loaded or stored. Loaded in this shape, a tile of several planes gets its warps along the
    planes (a warp's lanes cover SEG elements of one plane, the segments are its registers),
    so that each plane reduces within a warp (shuffles, no shared memory) and a thread does one
    plane's arithmetic, where a (planes, elements) tile would spread every plane over all the
    warps. ``_load_rows`` / ``_store_rows`` give and take the tile as (planes, elements);
    SEG = BLOCK_HW keeps the plain (planes, elements) tile."""
    offs, _ = _full_tile(t, BLOCK_HW, SEG)
    return offs, mask[None, :, None] & (offs < end)


@triton.jit
def _whole_tile(t, mask, BLOCK_HW: tl.constexpr, SEG: tl.constexpr):
    """``_tile`` for a tile known to lie within its planes: masked by ``mask`` (per plane) alone,
    no comparison per element."""
    offs, everywhere = _full_tile(t, BLOCK_HW, SEG)
    return offs, mask[None, :, None] & everywhere


@triton.jit
def _full_tile(t, BLOCK_HW: tl.constexpr, SEG: tl.constexpr):
    """``_tile`` for a tile the host knows to be full: every plane of the program exists and the
    tile lies within them. Its mask is the constant True, which the compiler folds away: loads
    and stores with no predicate, reductions with no select per element."""
    offs = t + (tl.arange(0, BLOCK_HW // SEG)[:, None, None] * SEG
                + tl.arange(0, SEG)[None, None, :]).to(tl.int64)
    return offs, tl.full([BLOCK_HW // SEG, 1, SEG], True, tl.int1)


@triton.jit
def _tile_mask(tile):
    """The mask of a tile as (planes, elements)."""
    return _rows(tile[1])


@triton.jit
def _rows(block):
    """A (segments, planes, SEG) block as (planes, segments * SEG): the same registers."""
    SEGMENTS: tl.constexpr = block.shape[0]
    PLANES: tl.constexpr = block.shape[1]
    SEG: tl.constexpr = block.shape[2]
    return tl.reshape(tl.permute(block, (1, 0, 2)), (PLANES, SEGMENTS * SEG))


@triton.jit
def _segments(rows, SEG: tl.constexpr):
    """The inverse of ``_rows``."""
    PLANES: tl.constexpr = rows.shape[0]
    ELEMENTS: tl.constexpr = rows.shape[1]
    return tl.permute(tl.reshape(rows, (PLANES, ELEMENTS // SEG, SEG)), (1, 0, 2))


@triton.jit
def _load_block(planes, tile, LANE_PLANES: tl.constexpr = 0):
    """A tile (``_tile``) of a planes view, as its (segments, planes, SEG) block; 0 on masked
    lanes. ``LANE_PLANES`` (planes adjacent in memory only: channels_last): each lane loads
    that many neighbouring planes at a position, where the compiler would load a 16-byte
    vector of them; a lane then holds, and reduces, fewer planes."""
    start, stride = planes
    offs, mask = tile
    pointers = start[None, :, None] + offs * stride
    if LANE_PLANES:
        pointers = tl.max_contiguous(pointers, [1, LANE_PLANES, 1])
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _load_rows(planes, tile, LANE_PLANES: tl.constexpr = 0):
    """A tile (``_tile``) of a planes view, as (planes, elements); 0 on masked lanes."""
    return _rows(_load_block(planes, tile, LANE_PLANES))


@triton.jit
def _store_rows(planes, tile, rows):
    """Stores (planes, elements) ``rows`` into a tile of a planes view, narrowed to its
    dtype."""
    start, stride = planes
    offs, mask = tile
    tl.store(start[None, :, None] + offs * stride,
             _segments(_narrow(rows, start.dtype.element_ty), offs.shape[2]), mask=mask)


@triton.jit
def _swept_tile(t, span, REVERSE: tl.constexpr, BLOCK_HW: tl.constexpr):
    """The tile a sweep of ``span = (start, end)`` reads at step ``t`` of ``range(start, end,
    BLOCK_HW)``: t itself, or with ``REVERSE`` its mirror, so that the sweep walks from the last
    tile to the first. (A negative range step would hide from the compiler that tiles start at
    multiples of BLOCK_HW, and with it the vectorized loads and stores.)"""
    if REVERSE:
        start, end = span
        last = start + ((end - 1 - start) // BLOCK_HW).to(tl.int64) * BLOCK_HW
        return last - (t - start)
    else:
        return t


@triton.jit
def _program_channels(N, C, BLOCK_C: tl.constexpr):
    """The channels of a per-channel program over (N, C) buffers: (c, mask, plane of n = 0,
    N * C); planes are then stepped by C in int64 (n * C in int32 wraps from 2^31 planes)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C, c.to(tl.int64), tl.cast(N, tl.int64) * C


@triton.jit
def _load_param(view, nc, mask, default, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """The value at each plane's ``nc = (n, c)`` in a param view; ``default`` when the view is
    None."""
    if view is None:
        return tl.full([BLOCK_R], default, ACC)
    else:
        pointer, n_stride, c_stride = view
        n, c = nc
        return tl.load(pointer + n * n_stride + c * c_stride, mask=mask, other=default).to(ACC)


@triton.jit
def _load_running(running, c, mask, ACC: tl.constexpr):
    """(running mean, running var) of each plane's channel."""
    mean_pointer, mean_stride, var_pointer, var_stride = running
    mean = tl.load(mean_pointer + c * mean_stride, mask=mask, other=0.0).to(ACC)
    var = tl.load(var_pointer + c * var_stride, mask=mask, other=1.0).to(ACC)
    return mean, var


@triton.jit
def _store_running(pointer, c, stride, value, mask):
    """Stores a running statistic in its tensor's dtype."""
    tl.store(pointer + c * stride, _narrow(value, pointer.dtype.element_ty), mask=mask)


@triton.jit
def _narrow(value, DTYPE: tl.constexpr):
    """``value`` in ``DTYPE``, rounded to nearest even, as a GPU converts. Below float64 through
    float32: torch converts double to half and bfloat16 that way, and Triton's interpreter gets
    a direct float64 to bfloat16 cast wrong. The interpreter also truncates float32 to bfloat16,
    so there the rounding is done on the bits first (compiled code never takes that branch)."""
    if DTYPE != tl.float64:
        value = value.to(tl.float32)
    if _INTERPRETED and DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    return value.to(DTYPE)


# What triton made of the kernels when it was imported: the interpreter's stand-ins when
# TRITON_INTERPRET=1 was set then (it is read at that moment, not later).
INTERPRETED = type(_narrow).__name__ == "InterpretedFunction"
_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def _field(Buffer, name, num_planes, plane):
    """Pointers to field ``name`` of a (fields, N * C) buffer at each plane (Stats,
    PlaneSums)."""
    return Buffer + name * tl.cast(num_planes, tl.int64) + plane  # 4 * N * C can wrap int32


@triton.jit
def _load_stats(Stats, num_planes, plane, mask):
    """(pivot, inv_scale, mean, var) of each plane from a Stats buffer."""
    return (tl.load(_field(Stats, PIVOT, num_planes, plane), mask=mask, other=0.0),
            tl.load(_field(Stats, INV_SCALE, num_planes, plane), mask=mask, other=1.0),
            tl.load(_field(Stats, MEAN, num_planes, plane), mask=mask, other=0.0),
            tl.load(_field(Stats, VAR, num_planes, plane), mask=mask, other=1.0))


@triton.jit
def _store_stats(Stats, num_planes, plane, mask, stats):
    """Writes (pivot, inv_scale, mean, var) of each plane into a Stats buffer."""
    pivot, inv_scale, mean, var = stats
    tl.store(_field(Stats, PIVOT, num_planes, plane), pivot, mask=mask)
    tl.store(_field(Stats, INV_SCALE, num_planes, plane), inv_scale, mask=mask)
    tl.store(_field(Stats, MEAN, num_planes, plane), mean, mask=mask)
    tl.store(_field(Stats, VAR, num_planes, plane), var, mask=mask)


@triton.jit
def _partial(Partials, name, num_planes, plane):
    """Pointers to field ``name`` of this program's chunk (grid axis 1) of a split plane's
    (fields, N * C, chunks) partials."""
    chunks = tl.num_programs(1)
    return Partials + (name * tl.cast(num_planes, tl.int64) + plane) * chunks + tl.program_id(1)


@triton.jit
def _chunk_partials(Partials, name, num_planes, plane, mask, chunks, BLOCK_CHUNKS: tl.constexpr):
    """Field ``name`` of every chunk of each plane, a [BLOCK_R, BLOCK_CHUNKS] tile (0 past the
    last chunk), for a combine pass to reduce in one fixed tree (deterministic)."""
    ks = tl.arange(0, BLOCK_CHUNKS)
    tile_mask = mask[:, None] & (ks[None, :] < chunks)
    starts = (name * tl.cast(num_planes, tl.int64) + plane) * chunks
    return tl.load(Partials + starts[:, None] + ks[None, :], mask=tile_mask, other=0.0)
