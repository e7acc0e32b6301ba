"""The passes for planes held in parts (distributed.py: planes sharded over their spatial dims):
the forward's normalize pass from given statistics, the backward's per-plane sums alone, and
the dx pass from given sums. Each a plan of launch.py like any call (heuristics.NORMALIZE,
BACKWARD_SUMS, BACKWARD_FROM_SUMS)."""

from . import heuristics, launch
from .kernels.constants import NUM_SUMS


def normalize(x, weight, bias, stats, eps: float, activation: int, negative_slope: float,
              residual=None):
    """y from given statistics: the forward's normalize pass alone, ``_fwd`` reading ``stats``
    (NUM_STATS fields of N * C planes, as the forward writes them), e.g. statistics of whole
    planes of which ``x`` holds a part."""
    x = launch.kernel_layout(x)
    y = launch.new_output(x)
    if x.numel() == 0:  # a part with no element of its planes
        return y
    residual = None if residual is None else launch.kernel_layout(residual)
    lay = launch.layout(heuristics.NORMALIZE,
                        (True, False, True, residual is not None, activation), x, y, residual)
    values = launch.host_values(lay, launch.FORWARD_PLANES, (x, y, residual), weight, bias, eps,
                                negative_slope)
    launch.execute(lay, x, dict(values, Stats=stats))
    return y


def backward_sums(dy, x, weight, bias, stats, use_input_stats: bool, eps: float, activation: int,
                  negative_slope: float, residual=None):
    """The backward's per-plane sums alone, (NUM_SUMS, N * C): SUM_DZ_XHAT and SUM_DZ over the
    elements of each plane that ``x`` holds (``_bwd_split_sums``, then ``_bwd_combine`` when the
    planes are split across programs)."""
    x = launch.kernel_layout(x)
    dy = launch.kernel_layout(dy)
    planes_n = x.shape[0] * x.shape[1]
    if x.numel() == 0:  # a part with no element of its planes
        return stats.new_zeros((NUM_SUMS, planes_n))
    residual = None if residual is None else launch.kernel_layout(residual)
    lay = launch.layout(heuristics.BACKWARD_SUMS, (use_input_stats, False, True,
                                                   residual is not None, activation), x, dy,
                        residual)
    values = launch.host_values(lay, ("x", "dy", "r"), (x, dy, residual), weight, bias, eps,
                                negative_slope)
    values = launch.execute(lay, x, dict(values, Stats=stats))
    if "PlaneSums" in values:  # combined from the chunks
        return values["PlaneSums"]
    return values["Partials"].view(NUM_SUMS, planes_n)


def backward_from_sums(dy, x, weight, bias, stats, plane_sums, count: int, use_input_stats: bool,
                       eps: float, activation: int, negative_slope: float, need_dw: bool,
                       need_db: bool, residual=None):
    """(dx, dweight, dbias, dresidual) as ``backward`` returns them, from given per-plane sums
    of planes of ``count`` elements, of which ``x`` holds a part: ``_bwd`` reading
    ``plane_sums``."""
    return launch.backward(dy, x, weight, bias, stats, use_input_stats, eps, activation,
                           negative_slope, need_dw, need_db, residual, plane_sums, count)
