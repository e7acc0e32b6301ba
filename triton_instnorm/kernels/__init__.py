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
``max|d|`` exceeds 2^40 the deltas are scaled, ``a = d * inv_s`` with ``inv_s = 1/max|d|``, so
that ``a^2`` cannot overflow float32 (spreads up to ~1e38 stay finite; the sweep is redone
scaled, which ordinary data never triggers); otherwise ``inv_s = 1`` and ``a = d``.

Per plane the forward keeps, in a (5, N*C) ``Stats`` buffer (ACC dtype):

    pivot K, inv_s, mean_a = E[a], std_a = sqrt(Var[a] + eps * inv_s^2), var_a = Var[a]
    x_hat = ((x - K) * inv_s - mean_a) / std_a        (true mean = K + mean_a / inv_s,
                                                        true rstd = inv_s / std_a)

The normalization divides (correctly rounded) instead of multiplying by a reciprocal: that is
what keeps 2-element planes with ``eps=0`` at exactly +-1 (``x * (1/x)`` is not always 1).

Backward, with ``dz = dy * act'(z)`` recomputed from x (the pre-activation is never stored):

    c1 = sum(dz * x_hat),  c2 = sum(dz)                    (per plane)
    dx = rstd * w * (dz - (c2 + x_hat * c1) / HW)          (input statistics)
    dx = rstd * w * dz                                     (given running statistics)
    dw[n, c] = c1,  db[n, c] = c2                          (partials, reduced over n in fixed order)

Planes too long for one program's tile can also be *split* across programs (grid axis 1 walks
chunks of the plane): a first launch writes per-chunk partial sums, a second combines them in a
fixed order (deterministic) and normalizes its chunk. That keeps every SM busy when there are
fewer planes than SMs, at the price of a second read of x (see perf/NOTES.md).

Files, in data-flow order: ``common.py`` (activations, exact division, plane indexing, the
shared sweeps), ``forward.py`` (``_fwd``, ``_fwd_split_stats``, ``_fwd_split_normalize``,
``_update_running_stats``), ``backward.py`` (``_bwd``, ``_bwd_split_sums``, ``_bwd_split_dx``,
``_sum_partials_over_n``). Host wrappers: ``launch.py``; launch configuration: ``heuristics.py``.
"""

from .backward import _bwd, _bwd_split_dx, _bwd_split_sums, _sum_partials_over_n
from .forward import _fwd, _fwd_split_normalize, _fwd_split_stats, _update_running_stats

__all__ = [
    "_fwd", "_fwd_split_stats", "_fwd_split_normalize", "_update_running_stats",
    "_bwd", "_bwd_split_sums", "_bwd_split_dx", "_sum_partials_over_n",
]
