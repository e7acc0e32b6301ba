"""Eager PyTorch compositions of what the kernels compute.

Users, none of them on the hot path:

- the calls the kernels do not compute (``dispatch.route``: a device without the kernels, the ONNX
  exporters, ``torch.func`` transforms, forward-mode AD): ``instance_norm``,
  ``adaptive_instance_norm`` and ``instance_stats`` compute the layers' functions with torch's
  own ops, PyTorch's ``instance_norm`` (``TORCH_INSTANCE_NORM``) and the activation's eager form,
  so that every transform torch supports gives torch's answer (or torch's error);
- double backward. The first-order gradients always come from the Triton backward kernel; when
  the caller asks for a graph of them (``torch.autograd.grad(..., create_graph=True)``, as a
  WGAN-GP gradient penalty or a Hessian-vector product does), ``first_order_graph`` rebuilds the
  forward from differentiable PyTorch ops and returns its vector-Jacobian product, whose
  derivatives PyTorch's autograd supplies to any order.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import apply_activation

# PyTorch's own function, taken when this package is imported: the compositions call it, never
# whatever ``triton_instnorm.enable()`` installs in its place.
TORCH_INSTANCE_NORM = F.instance_norm


def instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                  activation, negative_slope, residual=None):
    """``instance_norm`` in torch's ops: torch's function (running statistics updated by it),
    then the residual and the activation."""
    y = TORCH_INSTANCE_NORM(input, running_mean, running_var, weight, bias, use_input_stats,
                            momentum, eps)
    return apply_activation(y if residual is None else y + residual, activation, negative_slope)


def adaptive_instance_norm(input, scale, shift, eps, activation, negative_slope):
    """``adaptive_instance_norm`` in torch's ops: (1, C), (N, C) or (C,) scale and shift."""
    y = TORCH_INSTANCE_NORM(input, eps=eps)
    y = y * _per_channel_view(scale, input).to(y.dtype) + _per_channel_view(shift, input).to(
        y.dtype)
    return apply_activation(y, activation, negative_slope)


def instance_stats(input, eps):
    """``instance_stats`` in torch's ops: (mean, sqrt(biased var + eps)) per (n, c), in the
    accumulation dtype (float64 for float64 input, else float32), as the kernels give them."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(input.to(acc), tuple(range(2, input.dim())), correction=0)
    return mean, torch.sqrt(var + eps)


def _per_channel_view(p: Tensor, x: Tensor) -> Tensor:
    """A (C,), (1, C) or (N, C) parameter shaped to broadcast against (N, C, *spatial)."""
    rows = 1 if p.dim() == 1 else p.shape[0]
    return p.reshape((rows, x.shape[1]) + (1,) * (x.dim() - 2))


def first_order_graph(dy, x, weight, bias, mean, std, use_input_stats, eps, activation,
                      negative_slope, needs, residual=None):
    """(dx, dweight, dbias, dresidual) as differentiable functions of dy, x, weight and bias
    (and of a residual added before the activation).

    ``mean`` and ``std`` (shape (N, C), the statistics' precision) are the kernel's. The rebuild
    works in their units, ``xs = (x - mean) / std``, O(1) whatever the scale of x: the raw
    variance of x ~ 1e20 overflows float32, that of x ~ 1e-22 underflows, and either would
    flatten the graph. With ``use_input_stats`` the statistics of ``xs`` are recomputed (they
    depend on x; ``mean``, ``std`` only fix the units):
    ``(x - mu) / sqrt(var + eps) == (xs - mu_s) / sqrt(var_s + eps / std^2)``. Otherwise ``xs`` is
    already the normalized input. ``needs`` flags which of x, weight, bias and residual want a
    gradient; the others come back as None.
    """
    acc = mean.dtype
    shape = x.shape[:2] + (1,) * (x.dim() - 2)
    m, s = mean.view(shape), std.view(shape)
    if use_input_stats:
        # A plane with var + eps == 0 (constant, eps=0) has std 0: it is measured in units of 1
        # (x - mean is 0 there) and gets torch's rule, invstd = 0, with a zero derivative.
        s = torch.where(s > 0, s, 1.0)
    with torch.enable_grad():
        # Each input through an alias of its own: the gradient with respect to it then follows
        # its own uses only, not another input computed from it (adain's scale and shift are
        # functions of the style, which may be computed from the content).
        x, weight, bias, residual = (t if t is None else t.view_as(t)
                                     for t in (x, weight, bias, residual))
        inputs = [t for t, need in zip((x, weight, bias, residual), needs) if need]
        z = (x.to(acc) - m) / s
        if use_input_stats:
            var, mu = torch.var_mean(z, tuple(range(2, x.dim())), correction=0, keepdim=True)
            denominator = var + eps / s / s
            degenerate = denominator == 0
            inv_std = torch.rsqrt(torch.where(degenerate, 1.0, denominator))
            z = (z - mu) * torch.where(degenerate, 0.0, inv_std)
        if weight is not None:
            z = z * _per_channel_view(weight, x).to(acc)
        if bias is not None:
            z = z + _per_channel_view(bias, x).to(acc)
        if residual is not None:
            z = z + residual.to(acc)
        z = apply_activation(z, activation, negative_slope)
        grads = iter(torch.autograd.grad(z, inputs, dy.to(acc), create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def stats_grad_graph(dmean, dstd, x, eps):
    """The gradient through per-plane (mean, std = sqrt(biased var + eps)) outputs, as a
    differentiable function of dmean, dstd and x (double backward of AdaIN's style statistics)."""
    acc = dmean.dtype
    dims = tuple(range(2, x.dim()))
    shape = x.shape[:2] + (1,) * len(dims)
    with torch.enable_grad():
        xs = x.to(acc)
        var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
        grad = (dmean.view(shape) + dstd.view(shape) * (xs - mean) / torch.sqrt(var + eps))
        return (grad / x[0, 0].numel()).to(x.dtype)


class KernelValue(torch.autograd.Function):
    """``value`` (the kernel's gradient) carrying the derivatives of ``graph`` (the eager one):
    forward returns ``value``, backward hands the incoming gradient to ``graph``. (Arithmetic such
    as ``value + (graph - graph.detach())`` would turn the value into NaN wherever the eager
    rebuild overflows, inf - inf.)"""

    @staticmethod
    def forward(ctx, value, graph):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return None, grad
