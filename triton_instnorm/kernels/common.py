"""Building blocks shared by the forward and backward kernels (see the package docstring)."""

import triton
import triton.language as tl

# Activation codes shared with the host (``eager.ACTIVATIONS``).
# Globals read by @triton.jit code must be tl.constexpr instances (an annotation is not enough).
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACT_SILU = tl.constexpr(3)
ACT_GELU = tl.constexpr(4)

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
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _activation_grad(dy, z, slope, ACTIVATION: tl.constexpr):
    """dy * act'(z), with the same conventions at z == 0 as torch's own backward kernels."""
    if ACTIVATION == ACT_RELU:
        dy = tl.where(z <= 0, 0.0, dy)  # torch's threshold_backward passes dy through at NaN
    elif ACTIVATION == ACT_LEAKY_RELU:
        dy = tl.where(z > 0, dy, dy * slope)
    elif ACTIVATION == ACT_SILU:
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
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
def _plane_rows(pid, blocks_per_group, rows_per_group, C, BLOCK_R: tl.constexpr):
    """The BLOCK_R planes of program ``pid``: (group, row in group, mask, flat row = n*C + c, n, c),
    all 64-bit so that offsets never wrap on tensors of 2^31 elements or more."""
    group = pid // blocks_per_group
    r_in_group = (pid % blocks_per_group) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r_in_group < rows_per_group
    g64 = group.to(tl.int64)
    r64 = r_in_group.to(tl.int64)
    row = g64 * rows_per_group + r64
    return g64, r64, r_mask, row, row // C, row % C


@triton.jit
def _load_affine(W, B, n, c, w_sn, w_sc, b_sn, b_sc, r_mask, HAS_W: tl.constexpr,
                 HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """Scale and shift of each plane (w = 1, b = 0 when absent)."""
    if HAS_W:
        w = tl.load(W + n * w_sn + c * w_sc, mask=r_mask, other=1.0).to(ACC)
    else:
        w = tl.full([BLOCK_R], 1.0, ACC)
    if HAS_B:
        b = tl.load(B + n * b_sn + c * b_sc, mask=r_mask, other=0.0).to(ACC)
    else:
        b = tl.zeros([BLOCK_R], dtype=ACC)
    return w, b


@triton.jit
def _given_stats(RunMean, RunVar, c, rv_stride, r_mask, eps, ACC: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """Eval with running statistics, in the forward's terms: (pivot, inv_s, mean_a, std_a, var_a)."""
    pivot = tl.load(RunMean + c * rv_stride, mask=r_mask, other=0.0).to(ACC)
    var_a = tl.load(RunVar + c * rv_stride, mask=r_mask, other=1.0).to(ACC)
    return (pivot, tl.full([BLOCK_R], 1.0, ACC), tl.zeros([BLOCK_R], dtype=ACC),
            _sqrt(var_a + eps), var_a)


@triton.jit
def _store_stats(Stats, rows, row, mask, pivot, inv_s, mean_a, std_a, var_a):
    """The five per-plane statistics rows the backward and the running-stat update read."""
    rows = tl.cast(rows, tl.int64)  # 4 * rows wraps in int32 from 2^29 planes on
    tl.store(Stats + row, pivot, mask=mask)
    tl.store(Stats + rows + row, inv_s, mask=mask)
    tl.store(Stats + 2 * rows + row, mean_a, mask=mask)
    tl.store(Stats + 3 * rows + row, std_a, mask=mask)
    tl.store(Stats + 4 * rows + row, var_a, mask=mask)


@triton.jit
def _chunk_range(r_mask, CHUNK, HW, BLOCK_R: tl.constexpr):
    """This program's chunk of a split plane (grid axis 1): (chunk, num_chunks, start, end, first),
    ``first`` masking the rows for which this is chunk 0, the one that writes per-plane results."""
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    start = chunk.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    first = r_mask & ((tl.zeros([BLOCK_R], dtype=tl.int32) + chunk) == 0)
    return chunk, num_chunks, start, end, first


@triton.jit
def _store_partial(Partials, k, value, rows, row, r_mask, chunk, num_chunks):
    """Partial ``k`` of this chunk; Partials is laid out (K, rows, num_chunks)."""
    rows = tl.cast(rows, tl.int64)
    tl.store(Partials + k * rows * num_chunks + row * num_chunks + chunk, value, mask=r_mask)


@triton.jit
def _chunk_partials(Partials, k, rows, row, r_mask, num_chunks, BLOCK_CHUNKS: tl.constexpr):
    """Partial ``k`` of every chunk of each plane, a [BLOCK_R, BLOCK_CHUNKS] tile (0 past the last
    chunk). Every chunk's program reduces it with the same tree: they all agree bit for bit."""
    ks = tl.arange(0, BLOCK_CHUNKS)
    pm = r_mask[:, None] & (ks[None, :] < num_chunks)
    rows = tl.cast(rows, tl.int64)
    slots = k * rows * num_chunks + row[:, None] * num_chunks + ks[None, :]
    return tl.load(Partials + slots, mask=pm, other=0.0)


@triton.jit
def _shifted_sums(x_row, r_mask, start, end, x_ss, pivot, inv_s, ACC: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Over [start, end) of each plane: sum(a), sum(a^2) with a = (x - pivot) * inv_s, and
    max |x - pivot| (to detect the rare planes whose squares could overflow)."""
    cols = tl.arange(0, BLOCK_HW).to(tl.int64)
    s1 = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    s2 = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    mx = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
    for t in range(start, end, BLOCK_HW):
        offs = t + cols
        m = r_mask[:, None] & (offs[None, :] < end)
        xt = tl.load(x_row[:, None] + offs[None, :] * x_ss, mask=m, other=0.0)
        d = tl.where(m, xt.to(ACC) - pivot[:, None], 0.0)
        a = d * inv_s[:, None]
        s1 += a
        s2 += a * a
        mx = tl.maximum(mx, tl.abs(d))
    return tl.sum(s1, axis=1), tl.sum(s2, axis=1), tl.max(mx, axis=1)


@triton.jit
def _safe_shifted_sums(x_row, r_mask, start, end, x_ss, pivot, ACC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """_shifted_sums with the overflow guard: (s1, s2, inv_s). Ordinary data takes one sweep;
    a plane with max |x - pivot| > 2^40 is swept again with its deltas scaled by 1 / max."""
    inv_s = tl.full([BLOCK_R], 1.0, ACC)
    s1, s2, amax = _shifted_sums(x_row, r_mask, start, end, x_ss, pivot, inv_s, ACC, BLOCK_R,
                                 BLOCK_HW)
    if tl.max(tl.where(r_mask, amax, 0.0), axis=0) > BIG_DELTA:
        inv_s = tl.where(amax > BIG_DELTA, 1.0 / tl.maximum(amax, BIG_DELTA), 1.0).to(ACC)
        s1, s2, amax = _shifted_sums(x_row, r_mask, start, end, x_ss, pivot, inv_s, ACC, BLOCK_R,
                                     BLOCK_HW)
    return s1, s2, inv_s


@triton.jit
def _normalize_range(x_row, y_row, r_mask, start, end, x_ss, y_ss, pivot, inv_s, mean_a, std_a,
                     w, b, slope, ACC: tl.constexpr, ACTIVATION: tl.constexpr,
                     BLOCK_HW: tl.constexpr):
    """y = act(x_hat * w + b) over [start, end) of each plane, streamed in tiles."""
    cols = tl.arange(0, BLOCK_HW).to(tl.int64)
    for t in range(start, end, BLOCK_HW):
        offs = t + cols
        m = r_mask[:, None] & (offs[None, :] < end)
        xt = tl.load(x_row[:, None] + offs[None, :] * x_ss, mask=m, other=0.0).to(ACC)
        x_hat = _div((xt - pivot[:, None]) * inv_s[:, None] - mean_a[:, None], std_a[:, None])
        y = _activate(x_hat * w[:, None] + b[:, None], slope, ACTIVATION)
        tl.store(y_row[:, None] + offs[None, :] * y_ss, y.to(y_row.dtype.element_ty), mask=m)
