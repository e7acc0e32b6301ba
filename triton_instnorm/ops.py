"""The kernels as PyTorch operators (``torch.library``), with fake implementations and autograd.

Registering them as custom ops is what lets ``torch.compile(model, fullgraph=True)`` trace
through our layers without graph breaks, and declares the running-stat buffers as mutated so
that functionalization keeps their update. In eager mode the ops are thin calls into
``launch.py``; the backward below is the whole "autograd Function".

    triton_instnorm::forward                 -> (y, stats)
    triton_instnorm::update_running_stats    mutates running_mean, running_var
    triton_instnorm::backward                -> (dx, dweight, dbias)
    triton_instnorm::plane_stats             -> (mean, std, stats): AdaIN's style statistics
    triton_instnorm::stats_backward          -> dx through those statistics
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import eager, launch
from .kernels import constants


@torch.library.custom_op("triton_instnorm::forward", mutates_args=())
def forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    use_input_stats: bool,
    eps: float,
    activation: int,
    negative_slope: float,
    store_stats: bool,
) -> Tuple[Tensor, Tensor]:
    return launch.forward(x, weight, bias, running_mean, running_var, use_input_stats, eps,
                          activation, negative_slope, store_stats)


@forward.register_fake
def fake_forward(x, weight, bias, running_mean, running_var, use_input_stats, eps, activation,
      negative_slope, store_stats):
    y = torch.empty_like(launch.kernel_layout(x))
    rows = x.shape[0] * x.shape[1]
    stats = x.new_empty((constants.NUM_STATS, rows) if store_stats else (0,),
                        dtype=launch.acc_dtype(x.dtype))
    return y, stats


@torch.library.custom_op("triton_instnorm::update_running_stats",
                         mutates_args=("running_mean", "running_var"))
def update_running_stats(stats: Tensor, running_mean: Tensor, running_var: Tensor, n: int, c: int,
                         hw: int, momentum: float) -> None:
    launch.update_running_stats(stats, running_mean, running_var, n, c, hw, momentum)


@update_running_stats.register_fake
def fake_update_running_stats(stats, running_mean, running_var, n, c, hw, momentum):
    return None


@torch.library.custom_op("triton_instnorm::backward", mutates_args=())
def backward(
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
) -> Tuple[Tensor, Tensor, Tensor]:
    return launch.backward(dy, x, weight, bias, stats, use_input_stats, eps, activation,
                           negative_slope, need_dw, need_db)


@backward.register_fake
def _(dy, x, weight, bias, stats, use_input_stats, eps, activation, negative_slope, need_dw,
      need_db):
    dx = torch.empty_like(launch.kernel_layout(x))

    def grad(p, needed):
        if not needed or p is None:
            return x.new_empty((0,), dtype=stats.dtype)
        return torch.empty(p.shape, dtype=p.dtype, device=p.device)

    return dx, grad(weight, need_dw), grad(bias, need_db)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, use_input_stats, eps, activation, negative_slope, _ = inputs
    _, stats = output
    ctx.save_for_backward(x, weight, bias, stats)
    ctx.use_input_stats = use_input_stats
    ctx.eps = eps
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dy, _dstats):
    x, weight, bias, stats = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    with torch.no_grad():
        grads = backward(dy, x, weight, bias, stats, ctx.use_input_stats, ctx.eps, ctx.activation,
                         ctx.negative_slope, needs[1], needs[2])
    grads = [g if need else None for g, need in zip(grads, needs)]
    if torch.is_grad_enabled():
        # create_graph=True: keep the kernel's values, take the derivatives of the eager graph.
        graph = eager.first_order_graph(dy, x, weight, bias, *_mean_std(stats, ctx.eps),
                                        ctx.use_input_stats, ctx.eps, ctx.activation,
                                        ctx.negative_slope, needs)
        grads = [g if g is None else eager.KernelValue.apply(g, e) for g, e in zip(grads, graph)]
    return (*grads, None, None, None, None, None, None, None)


def _mean_std(stats, eps: float):
    """Per-plane mean and sqrt(var + eps), shape (N*C,), from the statistics buffer (the rows'
    meaning is in kernels/constants.py)."""
    inv_scale = stats[constants.INV_SCALE]
    std = torch.sqrt(stats[constants.VAR] + eps * inv_scale * inv_scale)
    return stats[constants.PIVOT] + stats[constants.MEAN] / inv_scale, std / inv_scale


torch.library.register_autograd("triton_instnorm::forward", _backward, setup_context=_setup_context)


@torch.library.custom_op("triton_instnorm::plane_stats", mutates_args=())
def plane_stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-(n, c) mean and sqrt(biased var + eps), shape (N, C), from the statistics pass of
    _fwd, and that pass's statistics buffer (what the backward reads)."""
    n, c = x.shape[0], x.shape[1]
    _, stats = launch.forward(x, None, None, None, None, True, eps, 0, 0.0, True, write_y=False)
    mean, std = _mean_std(stats, eps)
    return mean.view(n, c), std.view(n, c), stats


@plane_stats.register_fake
def fake_plane_stats(x, eps):
    shape = (x.shape[0], x.shape[1])
    acc = launch.acc_dtype(x.dtype)
    stats = x.new_empty((constants.NUM_STATS, shape[0] * shape[1]), dtype=acc)
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc), stats


@torch.library.custom_op("triton_instnorm::stats_backward", mutates_args=())
def stats_backward(dmean: Tensor, dstd: Tensor, x: Tensor, stats: Tensor, eps: float) -> Tensor:
    """dx = (dmean + dstd * (x - mean) / std) / HW, by the _stats_bwd kernel."""
    return launch.stats_backward(dmean, dstd, x, stats, eps)


@stats_backward.register_fake
def fake_stats_backward(dmean, dstd, x, stats, eps):
    return torch.empty_like(launch.kernel_layout(x))


def _stats_setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x, output[2])
    ctx.eps = eps
    ctx.mark_non_differentiable(output[2])


def _stats_backward(ctx, dmean, dstd, _dstats):
    x, stats = ctx.saved_tensors
    with torch.no_grad():
        dx = stats_backward(dmean, dstd, x, stats, ctx.eps)
    if torch.is_grad_enabled():  # create_graph=True: the kernel's values, the eager graph's derivatives
        dx = eager.KernelValue.apply(dx, eager.stats_grad_graph(dmean, dstd, x, ctx.eps))
    return dx, None


torch.library.register_autograd("triton_instnorm::plane_stats", _stats_backward,
                                setup_context=_stats_setup_context)
