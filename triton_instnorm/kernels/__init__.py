"""Triton kernels for instance normalization.

Words, one per concept:
  plane    the HW elements of one (n, c); ``plane`` also indexes it, n * C + c
  group    the planes sharing one group stride (the folded batch, or one sample); row: a
           plane's place in its group, BLOCK_R rows per program
  tile     the [BLOCK_R, BLOCK_HW] block a program holds in registers; segment (SEG): the
           elements of a plane its lanes read side by side
  chunk    the part of a plane one program covers on grid axis 1 (CHUNKED); chunks: their count
  split    planes cut into chunks whose partial sums a combine pass reduces (FROM_PARTIALS)
  pivot    the value near the data that deltas are taken from: a = (x - pivot) * inv_scale
  stats    a plane's four Stats fields (pivot, inv_scale, mean of a, var of a); field: one
           per-plane value of a (fields, N * C) buffer (Stats, PlaneSums, partials)
  normalizer  the forward's (pivot, gain, offset): z = (x - pivot) * gain + offset; rnorm:
           the backward's, from the saved stats: x_hat = (x - pivot) * gain - offset
  paths    single tile (FROM_TILE), looped (FROM_LOOP), split (FROM_PARTIALS), cluster

Every (n, c) pair owns one *plane* of ``HW`` elements (the flattened spatial dims). Per plane:

    mean = E[x],  var = E[(x - mean)^2]  (biased),  rstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd
    z = x_hat * w[n, c] + b[n, c]         (w, b per channel, or per sample for adaptive IN)
          + r                             (a residual of x's shape, when one is given)
    y = act(z)                            (identity, relu, leaky_relu, silu or exact gelu)

Statistics are computed in the accumulation dtype ``ACC`` (float32, float64 for float64 input)
by reductions that never take a difference of large sums, so they hold wherever the data sit: a
mean large against the spread (``1e4 + 1e-2 * randn`` keeps ~1e-7 relative error, where plain
sum / sum-of-squares loses everything), an outlier anywhere, parts of a plane far apart.
Values are taken relative to a *pivot* near the data, ``a = (x - pivot) * INV_SCALE``
(``x - pivot`` exact for data near it):

- a plane that fits one tile is held in registers and read once: ``pivot = x[plane, 0]``, then
  the corrected two-pass algorithm (mean, deviations from it, whose sum corrects the mean and
  M2). Where x[plane, 0] lies more than 2 standard deviations from the mean (an outlier), the
  pivot moves to the mean rounded to ACC, its rest exact by TwoSum, so that ``x - pivot`` rounds
  like ``x - mean``; elsewhere it stays x[plane, 0] bit for bit (2-element and constant planes
  stay exact);
- a longer plane is streamed in tiles: the first tile moves the pivot from x[plane, 0] to
  its own mean; each lane keeps running statistics (count, mean, M2) of the positions it holds,
  each tile's values of a position taken by a two-pass in the lane's registers and merged in
  tile order with Chan's parallel formula (no reduction across threads inside the loop); the
  lanes are combined once at the end, by Chan's formula in its corrected two-pass form; the
  pivot ends at the mean rounded to ACC;
- a split plane's chunks do the same and hand the combine pass their mean as hi + lo and their
  RMS deviation; the combine merges the chunks by Chan's formula in its corrected two-pass form,
  in a fixed order (deterministic), and the pivot is the chunk-weighted mean.

When the unscaled sums of a plane overflow (squares of deltas beyond ~1e19), its statistics are
redone with the deltas scaled (``INV_SCALE`` ~ 1 / spread when the spread exceeds 2^40), so
that spreads up to ~1e38 stay finite: a branch ordinary data never takes, whose sums come out
finite; otherwise ``INV_SCALE = 1`` and ``a = x - pivot``.

Per plane the forward keeps, in a (NUM_STATS, N * C) ``Stats`` buffer (ACC dtype; fields named
in ``constants.py``):

    PIVOT, INV_SCALE, MEAN = E[a], VAR = Var[a]        (std = sqrt(VAR + eps * INV_SCALE^2))
    x_hat = ((x - PIVOT) * INV_SCALE - MEAN) / std     (true mean = PIVOT + MEAN / INV_SCALE,
                                                        true rstd = INV_SCALE / std)

The normalization is one multiply-add per element, ``z = (x - pivot) * gain + offset`` with
``gain = w * inv_scale / std`` (one correctly rounded division per plane) and ``offset = b -
mean * w / std``; only with ``eps = 0`` (the ``EXACT`` constexpr) does it divide by std per
element, correctly rounded: that keeps 2-element planes at exactly +-1 (``x * (1/x)`` is not
always 1), which only eps = 0 makes exact in the first place. A plane whose statistics give
``var + eps == 0`` (a constant plane with ``eps=0``) takes torch's
rule ``rstd = 0`` (std = +inf): y is exactly the shift, dx = 0, dweight gets 0 from it. Given
running statistics (eval) are used as they are, as torch does.

Backward, with ``dz = dy * act'(z)`` recomputed from x (the pre-activation is never stored):

    c1 = sum(dz * x_hat),  c2 = sum(dz)                    (per plane: PlaneSums)
    dx = rstd * w * (dz - (c2 + x_hat * c1) / HW)          (input statistics)
    dx = rstd * w * dz                                     (given running statistics)
    dw[n, c] = c1,  db[n, c] = c2                          (partials, reduced over n in fixed order)
    dr = dz                                                (the residual's, by the dx pass)

One kernel per pass. A pass takes its per-plane reductions from one of four sources, a constexpr
(``STATS_FROM`` / ``SUMS_FROM``): ``FROM_TILE``, a plane that fits one tile (of one CTA, or of a
cluster), held in registers and read once; ``FROM_LOOP``, a longer plane streamed twice by its
program in a loop; ``FROM_PARTIALS``,
a plane *split* across programs (grid axis 1 walks its chunks), whose first pass
(``_fwd_split_stats`` / ``_bwd_split_sums``) wrote per-chunk partial sums that a combine pass
(``_fwd_combine`` / ``_bwd_combine``) reduced once per plane in a fixed order (deterministic)
into ``Stats`` / ``PlaneSums``, which every chunk then reads; ``FROM_RUNNING``, the given running
statistics; its chunks then simply share the elementwise normalize pass. Splitting keeps every
SM busy when there are few planes, at the price of a second read of x from memory (see
perf/NOTES.md). A plane streamed twice by one program sweeps the second time backwards: the
tiles the first sweep read last are the likeliest to be in L2 still.

From a module to the kernels:

    InstanceNorm2d.forward (modules.py) -> instance_norm (functional.py: PyTorch's checks)
      -> torch.ops.triton_instnorm.forward (ops.py: custom op, autograd)
      -> launch.forward (launch.py: tensors as views; the call's plan from heuristics.plan,
         cached; the plan executed, triton_instnorm.explain prints it)
      -> [_fwd_split_stats, _fwd_combine], _fwd (forward.py); the backward: launch.backward
         -> [_bwd_split_sums, _bwd_combine], _bwd, _sum_partials_over_n (backward.py);
         running statistics: _update_running_stats;
         AdaIN's style statistics: launch.forward (statistics only) and launch.stats_backward
         -> _stats_bwd

Files, in data-flow order: ``constants.py`` (what the host shares with the kernels),
``common.py`` (views, activations, exact division, tiles and chunks), ``moments.py`` (the
statistics), ``forward.py``, ``backward.py``.
"""

from .backward import _bwd, _bwd_combine, _bwd_split_sums, _stats_bwd, _sum_partials_over_n
from .forward import _fwd, _fwd_combine, _fwd_split_stats, _update_running_stats

__all__ = [
    "_fwd_split_stats", "_fwd_combine", "_fwd", "_update_running_stats",
    "_bwd_split_sums", "_bwd_combine", "_bwd", "_sum_partials_over_n", "_stats_bwd",
]
