"""Integer constants the kernels and the host share, named once for both.

Plain integers, so the host can import them without triton; ``common.py`` wraps them as
``tl.constexpr`` for the kernels (jit code reads globals only as constexprs).

``ACT_*``: the ``ACTIVATION`` constexpr (``eager.ACTIVATIONS`` maps names to them).
``FROM_*``: where a pass takes its per-plane reductions (statistics in the forward, sums in the
backward), the ``STATS_FROM`` / ``SUMS_FROM`` constexprs.

``Stats``, shape (NUM_STATS, N * C), accumulation dtype: what the forward keeps per plane for the
backward and the running-statistics update (the math is in the package docstring): the mean is
``PIVOT + MEAN / INV_SCALE``, an unevaluated sum, the variance ``VAR / INV_SCALE^2``. The
backward recomputes ``std = sqrt(VAR + eps * INV_SCALE^2)`` exactly as the forward did, so four
values per plane are all that is stored.

``PlaneSums``, shape (NUM_SUMS, N * C), accumulation dtype: the backward's per-plane sums,
which are also the per-(n, c) partials of dweight and dbias.

Split planes (grid axis 1 walks chunks of each plane) also exchange per-chunk partials laid out
(fields, N * C, chunks): the forward's are ``CHUNK_HI``, ``CHUNK_LO``, ``CHUNK_RMS``
(NUM_FWD_PARTIALS fields; a chunk's element count follows from HW and the chunk count), the
backward's are ``SUM_DZ_XHAT``, ``SUM_DZ`` (NUM_SUMS fields).
"""

ACT_NONE, ACT_RELU, ACT_LEAKY_RELU, ACT_SILU, ACT_GELU = range(5)

FROM_TILE = 0  # computed from a plane that fits one tile: held in registers, read once
FROM_LOOP = 1  # computed from the plane streamed in tiles: the plane is read twice
FROM_PARTIALS = 2  # a split plane: its chunks' partials, combined once by a combine pass
FROM_RUNNING = 3  # given: the running statistics (forward in eval mode)

# Stats fields
PIVOT = 0  # near the plane's data: x[plane, 0], or the mean rounded to ACC (docstring)
INV_SCALE = 1  # a = (x - PIVOT) * INV_SCALE: 1 unless the spread of x exceeds 2^40 (then ~1/spread)
MEAN = 2  # mean of a (the rest of the mean when the pivot is the rounded mean)
VAR = 3  # biased variance of a
NUM_STATS = 4

# Forward split partials, per chunk
CHUNK_HI = 0  # the chunk's mean of x, rounded
CHUNK_LO = 1  # the rest of it: mean = CHUNK_HI + CHUNK_LO
CHUNK_RMS = 2  # its RMS deviation sqrt(sum((x - mean)^2) / count)
NUM_FWD_PARTIALS = 3

# PlaneSums fields; also the backward split partials, per chunk
SUM_DZ_XHAT = 0  # sum(dz * x_hat): the dweight partial
SUM_DZ = 1  # sum(dz): the dbias partial
NUM_SUMS = 2
