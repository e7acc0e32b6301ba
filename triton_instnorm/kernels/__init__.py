"""Triton kernels for instance normalization.

Every (n, c) pair owns one *plane* of ``HW`` elements (the flattened spatial dims). Per plane:

    mean = E[x],  var = E[(x - mean)^2]  (biased),  rstd = 1 / sqrt(var + eps)
    x_hat = (x - mean) * rstd
    z = x_hat * w[n, c] + b[n, c]         (w, b per channel, or per sample for adaptive IN)
    y = act(z)                            (identity, relu, leaky_relu, silu or exact gelu)

Statistics are computed in the accumulation dtype ``ACC`` (float32, float64 for float64 input)
around a *pivot* ``K = x[plane, 0]``: with ``d = x - K`` the sums of ``d`` and ``d^2`` do not
cancel catastrophically when the mean is large relative to the spread (``1e4 + 1e-2 * randn``
keeps ~1e-7 relative error, where plain sum / sum-of-squares loses everything). Planes that fit
one tile are reduced exactly in registers (two passes over registers, one read of DRAM); longer
planes accumulate per-lane shifted sums ``S1 = sum(d)``, ``S2 = sum(d^2)`` over tiles and use
``var = S2/n - (S1/n)^2``, accurate because ``K`` lies inside the plane's range. When
``max|d|`` exceeds 2^40 the deltas are scaled, ``a = d * inv_scale`` with ``inv_scale =
1/max|d|``, so that ``a^2`` cannot overflow float32 (spreads up to ~1e38 stay finite; the sweep is
redone scaled, which ordinary data never triggers); otherwise ``inv_scale = 1`` and ``a = d``.

Per plane the forward keeps, in a (NUM_STATS, N*C) ``Stats`` buffer (ACC dtype; rows named in
``constants.py``):

    PIVOT K, INV_SCALE, MEAN = E[a], VAR = Var[a]          (std = sqrt(VAR + eps * INV_SCALE^2))
    x_hat = ((x - K) * INV_SCALE - MEAN) / std        (true mean = K + MEAN / INV_SCALE,
                                                       true rstd = INV_SCALE / std)

The normalization divides (correctly rounded) instead of multiplying by a reciprocal: that is
what keeps 2-element planes with ``eps=0`` at exactly +-1 (``x * (1/x)`` is not always 1).

Backward, with ``dz = dy * act'(z)`` recomputed from x (the pre-activation is never stored):

    c1 = sum(dz * x_hat),  c2 = sum(dz)                    (per plane: PlaneSums)
    dx = rstd * w * (dz - (c2 + x_hat * c1) / HW)          (input statistics)
    dx = rstd * w * dz                                     (given running statistics)
    dw[n, c] = c1,  db[n, c] = c2                          (partials, reduced over n in fixed order)

One kernel per pass. A pass takes its per-plane reductions from one of four sources, a constexpr
(``STATS_FROM`` / ``SUMS_FROM``): ``FROM_TILE``, a plane that fits one tile, held in registers
and read once; ``FROM_PLANE``, a longer plane streamed twice by its program; ``FROM_PARTIALS``,
a plane *split* across programs (grid axis 1 walks its chunks), whose first pass
(``_fwd_split_stats`` / ``_bwd_split_sums``) wrote per-chunk partial sums that a combine pass
(``_fwd_combine`` / ``_bwd_combine``) reduced once per plane in a fixed order (deterministic)
into ``Stats`` / ``PlaneSums``, which every chunk then reads; ``FROM_RUNNING``, the given running
statistics. Splitting keeps every SM busy when there are few planes, at the price of a second
read of x from memory (see perf/NOTES.md).

From a module to the kernels:

    InstanceNorm2d.forward (modules.py) -> instance_norm (functional.py: PyTorch's checks)
      -> torch.ops.triton_instnorm.forward (ops.py: custom op, autograd)
      -> launch.forward (launch.py: tensors as views, launch configuration from heuristics.py)
      -> [_fwd_split_stats, _fwd_combine], _fwd (forward.py); the backward: launch.backward
         -> [_bwd_split_sums, _bwd_combine], _bwd, _sum_partials_over_n (backward.py); running statistics: _update_running_stats;
         AdaIN's style statistics: launch.forward (statistics only) and launch.stats_backward
         -> _stats_bwd

Files, in data-flow order: ``constants.py`` (what the host shares with the kernels),
``common.py`` (views, activations, exact division, the shared sweeps), ``forward.py``,
``backward.py``.
"""

from .backward import _bwd, _bwd_combine, _bwd_split_sums, _stats_bwd, _sum_partials_over_n
from .forward import _fwd, _fwd_combine, _fwd_split_stats, _update_running_stats

__all__ = [
    "_fwd_split_stats", "_fwd_combine", "_fwd", "_update_running_stats",
    "_bwd_split_sums", "_bwd_combine", "_bwd", "_sum_partials_over_n", "_stats_bwd",
]
