"""The kernels as PyTorch operators (``torch.library``), with fake implementations and autograd.

Registering them as custom ops is what lets ``torch.compile(model, fullgraph=True)`` trace
through our layers without graph breaks, lets ``torch.export`` see one operator per layer, and
declares the running-stat buffers as mutated so that functionalization keeps their update:

    triton_instnorm::forward                 -> (y, stats)
    triton_instnorm::update_running_stats    mutates running_mean, running_var
    triton_instnorm::backward                -> (dx, dweight, dbias, dresidual)
    triton_instnorm::plane_stats             -> (mean, std, stats): AdaIN's style statistics
    triton_instnorm::stats_backward          -> dx through those statistics

What the backward reads is decided where the graph runs, never where it was captured: no
argument of an operator says whether autograd will record it. ``forward`` always writes the
per-plane statistics (4 values per plane; the output is N*C*HW), so a graph captured by
``torch.jit.trace``, ``torch.export`` or ``torch.compile`` without grad can be differentiated
later; every pass that reads statistics checks, on the host, that it was given the buffer its
forward writes, and raises rather than launch otherwise.

The layers call the functions at the bottom of this file (``forward``, ``plane_stats``, ...),
which send each call where ``dispatch.route`` says: the operators, or in plain eager mode a plain
``torch.autograd.Function`` with the operators' own autograd formula (``_setup_context``,
``_backward``), or the launch itself when no gradient is needed (the statistics then written only
if the caller reads them).
"""

import contextlib
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import eager as eager_graphs
from . import launch
from .dispatch import EAGER, plain_eager, route
from .arguments import dtype_name
from .kernels import constants

# --- the operators --------------------------------------------------------------------------------


@torch.library.custom_op("triton_instnorm::forward", mutates_args=())
def forward_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    use_input_stats: bool,
    eps: float,
    activation: int,
    negative_slope: float,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return launch.forward(x, weight, bias, running_mean, running_var,
                          use_input_stats=use_input_stats, eps=eps, activation=activation,
                          negative_slope=negative_slope, store_stats=True, residual=residual)


@forward_op.register_fake
def forward_fake(x, weight, bias, running_mean, running_var, use_input_stats, eps, activation,
                 negative_slope, residual=None):
    _warn_if_onnx_export()
    y = torch.empty_like(launch.kernel_layout(x))
    return y, _stats_like(x)


def _stats_like(x):
    """The (NUM_STATS, N, C) statistics buffer a forward of ``x`` writes (uninitialized)."""
    return x.new_empty((constants.NUM_STATS, x.shape[0], x.shape[1]),
                       dtype=launch.acc_dtype(x.dtype))


def _check_stats(stats, x, op: str):
    """The statistics a pass over ``x`` reads are the buffer a forward of ``x`` writes; anything
    else (an empty placeholder, another shape or dtype) is refused before any launch."""
    n, c = x.shape[0], x.shape[1]
    if (stats.shape != (constants.NUM_STATS, n, c)
            or stats.dtype is not (torch.float64 if x.dtype is torch.float64 else torch.float32)):
        _refuse_stats(stats, n, c, launch.acc_dtype(x.dtype), op)


def _refuse_stats(stats, n, c, acc, op):
    raise RuntimeError(
        f"triton_instnorm::{op}: expected the statistics a forward of {n} x {c} planes writes, "
        f"shape ({constants.NUM_STATS}, {n}, {c}) of {dtype_name(acc)}; got shape "
        f"{tuple(stats.shape)} of {dtype_name(stats.dtype)}")


def _warn_if_onnx_export():
    """The ONNX exporters never see the operators of a model they export (``route``); they do in
    a graph captured earlier, which the dynamo exporter translates with the table."""
    if torch.onnx.is_in_onnx_export():
        warnings.warn("a graph captured before the ONNX export (an ExportedProgram) holds "
                      "triton_instnorm operators: the dynamo exporter translates them only with "
                      "custom_translation_table=triton_instnorm.onnx_translation_table()",
                      UserWarning, stacklevel=2)


@torch.library.custom_op("triton_instnorm::update_running_stats",
                         mutates_args=("running_mean", "running_var"))
def update_running_stats_op(stats: Tensor, running_mean: Tensor, running_var: Tensor, n: int,
                            c: int, hw: int, momentum: float) -> None:
    _update_running_stats(stats, running_mean, running_var, n, c, hw, momentum)


def _update_running_stats(stats, running_mean, running_var, n, c, hw, momentum):
    if (stats.shape != (constants.NUM_STATS, n, c)
            or stats.dtype not in (torch.float32, torch.float64)):
        _refuse_stats(stats, n, c, torch.float32, "update_running_stats")
    if running_mean.numel() != c or running_var.numel() != c:
        raise RuntimeError(f"triton_instnorm::update_running_stats: expected {c} running "
                           f"statistics, got {running_mean.numel()} and {running_var.numel()}")
    launch.update_running_stats(stats, running_mean, running_var, n=n, c=c, hw=hw,
                                momentum=momentum)


@update_running_stats_op.register_fake
def update_running_stats_fake(stats, running_mean, running_var, n, c, hw, momentum):
    return None


@torch.library.custom_op("triton_instnorm::backward", mutates_args=())
def backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    stats: Tensor,
    use_input_stats: bool,
    eps: float,
    activation: int,
    negative_slope: float,
    need_dw: bool,
    need_db: bool,
    residual: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_stats(stats, x, "backward")
    return launch.backward(dy, x, weight, bias, stats, use_input_stats, eps, activation,
                           negative_slope, need_dw, need_db, residual)


@backward_op.register_fake
def backward_fake(dy, x, weight, bias, stats, use_input_stats, eps, activation, negative_slope,
                  need_dw, need_db, residual=None):
    dx = torch.empty_like(launch.kernel_layout(x))
    dres = x.new_empty((0,)) if residual is None else torch.empty_like(
        launch.kernel_layout(residual))

    def grad(p, needed):
        if not needed or p is None:
            return x.new_empty((0,), dtype=stats.dtype)
        return torch.empty(p.shape, dtype=p.dtype, device=p.device)

    return dx, grad(weight, need_dw), grad(bias, need_db), dres


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, use_input_stats, eps, activation, negative_slope, *residual = inputs
    _, stats = output
    # The residual's gradient is dy itself without an activation; with one, the backward
    # recomputes the activation's input from it.
    residual = residual[0] if residual and activation != constants.ACT_NONE else None
    ctx.save_for_backward(x, weight, bias, stats, residual)
    ctx.use_input_stats = use_input_stats
    ctx.eps = eps
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dy, _dstats):
    """The gradients of x, weight, bias, then None for the other inputs but the residual, whose
    gradient comes last (None when the forward had no residual)."""
    x, weight, bias, stats, residual = ctx.saved_tensors
    # (the residual is the last input of the operator and of InstanceNorm.forward alike)
    needs = (*ctx.needs_input_grad[:3], ctx.needs_input_grad[-1])
    create_graph = torch.is_grad_enabled()
    if any(needs[:3]) or (needs[3] and residual is not None):
        with torch.no_grad() if create_graph else contextlib.nullcontext():
            grads = backward(dy, x, weight, bias, stats, use_input_stats=ctx.use_input_stats,
                             eps=ctx.eps, activation=ctx.activation,
                             negative_slope=ctx.negative_slope, need_dw=needs[1],
                             need_db=needs[2], residual=residual)  # dz needs it, dr or not
    else:
        grads = (None, None, None, None)
    if needs[3] and residual is None:  # no activation: the sum's gradient passes through
        grads = (*grads[:3], dy)
    grads = [g if need else None for g, need in zip(grads, needs)]
    if create_graph:  # keep the kernel's values, take the derivatives of the eager graph
        mean, std = _mean_std(stats, ctx.eps)
        graph = eager_graphs.first_order_graph(
            dy, x, weight, bias, mean, std, use_input_stats=ctx.use_input_stats, eps=ctx.eps,
            activation=ctx.activation, negative_slope=ctx.negative_slope,
            needs=(*needs[:3], needs[3] and residual is not None), residual=residual)
        grads = [g if g is None or g is dy else eager_graphs.KernelValue.apply(g, e)
                 for g, e in zip(grads, graph)]
    return (*grads[:3], None, None, None, None, None, None, grads[3])


def _mean_std(stats, eps: float):
    """Per-plane mean and sqrt(var + eps), shape (N, C), from the statistics buffer (the fields'
    meaning is in kernels/constants.py)."""
    inv_scale = stats[constants.INV_SCALE]
    std = torch.sqrt(stats[constants.VAR] + eps * inv_scale * inv_scale)
    return stats[constants.PIVOT] + stats[constants.MEAN] / inv_scale, std / inv_scale


torch.library.register_autograd("triton_instnorm::forward", _backward, setup_context=_setup_context)


def _plane_stats(x, eps):
    n, c = x.shape[0], x.shape[1]
    _, stats = launch.forward(x, None, None, None, None, use_input_stats=True, eps=eps,
                              activation=constants.ACT_NONE, negative_slope=0.0,
                              store_stats=True, write_y=False)
    mean, std = _mean_std(stats, eps)
    return mean.view(n, c), std.view(n, c), stats


@torch.library.custom_op("triton_instnorm::plane_stats", mutates_args=())
def plane_stats_op(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-(n, c) mean and sqrt(biased var + eps), shape (N, C), from the statistics pass of
    _fwd, and that pass's statistics buffer (what the backward reads)."""
    return _plane_stats(x, eps)


@plane_stats_op.register_fake
def plane_stats_fake(x, eps):
    _warn_if_onnx_export()
    shape = (x.shape[0], x.shape[1])
    acc = launch.acc_dtype(x.dtype)
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc), _stats_like(x)


@torch.library.custom_op("triton_instnorm::stats_backward", mutates_args=())
def stats_backward_op(dmean: Tensor, dstd: Tensor, x: Tensor, stats: Tensor,
                      eps: float) -> Tensor:
    """dx = (dmean + dstd * (x - mean) / std) / HW, by the _stats_bwd kernel."""
    return _stats_backward_launch(dmean, dstd, x, stats, eps)


def _stats_backward_launch(dmean, dstd, x, stats, eps):
    _check_stats(stats, x, "stats_backward")
    n, c = x.shape[0], x.shape[1]
    if dmean.shape != (n, c) or dstd.shape != (n, c):
        raise RuntimeError(f"triton_instnorm::stats_backward: expected ({n}, {c}) gradients of "
                           f"the mean and std, got {tuple(dmean.shape)} and {tuple(dstd.shape)}")
    return launch.stats_backward(dmean, dstd, x, stats, eps=eps)


@stats_backward_op.register_fake
def stats_backward_fake(dmean, dstd, x, stats, eps):
    return torch.empty_like(launch.kernel_layout(x))


def _stats_setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x, output[2])
    ctx.eps = eps
    ctx.mark_non_differentiable(output[2])


def _stats_backward(ctx, dmean, dstd, _dstats):
    x, stats = ctx.saved_tensors
    with torch.no_grad():
        dx = stats_backward(dmean, dstd, x, stats, eps=ctx.eps)
    if torch.is_grad_enabled():  # create_graph: the kernel's values, the eager graph's derivatives
        dx = eager_graphs.KernelValue.apply(
            dx, eager_graphs.stats_grad_graph(dmean, dstd, x, ctx.eps))
    return dx, None


torch.library.register_autograd("triton_instnorm::plane_stats", _stats_backward,
                                setup_context=_stats_setup_context)


# --- what the layers call -------------------------------------------------------------------------

class InstanceNorm(torch.autograd.Function):
    """``triton_instnorm::forward`` in eager mode: the operator's launch and autograd formula.
    The non-tensor arguments travel as one tuple (``apply`` inspects each argument)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, scalars, residual):
        inputs = (x, weight, bias, running_mean, running_var, *scalars, residual)
        output = launch.forward(*inputs[:-1], store_stats=True, residual=residual)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy, dstats):
        grads = _backward(ctx, dy, dstats)
        return (*grads[:5], None, grads[-1])


# ``Function.apply`` without its Python wrapper, whose work is all void on the eager path: it binds
# default arguments for functions with a separate setup_context (InstanceNorm has none), sends
# calls under torch.func transforms elsewhere and unwraps tensors left over from finished
# transforms (route rules out both). The wrapper costs ~2 us, a tenth of the layer.
_instance_norm_apply = super(torch.autograd.Function, InstanceNorm).apply


class PlaneStats(torch.autograd.Function):
    """``triton_instnorm::plane_stats`` in eager mode: the operator's launch and autograd."""

    @staticmethod
    def forward(ctx, x, eps):
        output = _plane_stats(x, eps)
        _stats_setup_context(ctx, (x, eps), output)
        return output

    backward = staticmethod(_stats_backward)


def forward(x, weight, bias, running_mean, running_var, *, use_input_stats: bool, eps: float,
            activation: int, negative_slope: float, store_stats: bool = False,
            eager: bool | None = None, residual=None):
    """``triton_instnorm::forward``: (y, stats). ``store_stats``: the caller reads the statistics
    (the running-stat update); they are written too wherever autograd may record the call.
    ``eager``: the call's route is ``EAGER`` (found out here when not given). ``residual``: added
    before the activation."""
    if eager is None:
        eager = plain_eager(x, weight, bias, running_mean, running_var, residual)
    scalars = (use_input_stats, eps, activation, negative_slope)
    if not eager:
        return forward_op(x, weight, bias, running_mean, running_var, *scalars, residual)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        return _instance_norm_apply(x, weight, bias, running_mean, running_var, scalars,
                                    residual)
    return launch.forward(x, weight, bias, running_mean, running_var, *scalars,
                          store_stats=store_stats, residual=residual)


def update_running_stats(stats, running_mean, running_var, *, n: int, c: int, hw: int,
                         momentum: float, eager: bool | None = None) -> None:
    """``triton_instnorm::update_running_stats``: the running statistics updated in place."""
    if eager is None:
        eager = plain_eager(stats, running_mean, running_var)
    if not eager:
        return update_running_stats_op(stats, running_mean, running_var, n, c, hw, momentum)
    _update_running_stats(stats, running_mean, running_var, n, c, hw, momentum)
    torch.autograd.graph.increment_version((running_mean, running_var))  # as the operator does


def backward(dy, x, weight, bias, stats, *, use_input_stats: bool, eps: float, activation: int,
             negative_slope: float, need_dw: bool, need_db: bool, residual=None):
    """``triton_instnorm::backward``: (dx, dweight, dbias, dresidual)."""
    args = (dy, x, weight, bias, stats, use_input_stats, eps, activation, negative_slope,
            need_dw, need_db, residual)
    if route(dy, x, weight, bias, stats, residual) != EAGER:
        return backward_op(*args)
    _check_stats(stats, x, "backward")
    return launch.backward(*args)


def plane_stats(x, *, eps: float, eager: bool | None = None):
    """``triton_instnorm::plane_stats``: (mean, std, stats)."""
    if not (plain_eager(x) if eager is None else eager):
        return plane_stats_op(x, eps)
    if torch.is_grad_enabled() and x.requires_grad:
        return PlaneStats.apply(x, eps)
    return _plane_stats(x, eps)


def stats_backward(dmean, dstd, x, stats, *, eps: float):
    """``triton_instnorm::stats_backward``: dx through the style statistics."""
    if not plain_eager(dmean, dstd, x, stats):
        return stats_backward_op(dmean, dstd, x, stats, eps)
    return _stats_backward_launch(dmean, dstd, x, stats, eps)
