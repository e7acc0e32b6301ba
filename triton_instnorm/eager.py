"""Eager PyTorch compositions of what the kernels compute.

Two users, neither of them on the hot path:

- the documented fallback (CPU tensors without ``TRITON_INTERPRET=1``) applies the activation
  epilogue with ``apply_activation``;
- double backward. The first-order gradients always come from the Triton backward kernel; when
  the caller asks for a graph of them (``torch.autograd.grad(..., create_graph=True)``, as a
  WGAN-GP gradient penalty or a Hessian-vector product does), ``first_order_graph`` rebuilds the
  forward from differentiable PyTorch ops and returns its vector-Jacobian product, whose
  derivatives PyTorch's autograd supplies to any order.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}
_ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}


def apply_activation(y: Tensor, activation, negative_slope: float) -> Tensor:
    """The fused epilogue in eager PyTorch; ``activation`` is a name or a code of ACTIVATIONS."""
    activation = _ACTIVATION_NAMES.get(activation, activation)
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


def _per_channel_view(p: Tensor, x: Tensor) -> Tensor:
    """A (C,), (1, C) or (N, C) parameter shaped to broadcast against (N, C, *spatial)."""
    rows = 1 if p.dim() == 1 else p.shape[0]
    return p.reshape((rows, x.shape[1]) + (1,) * (x.dim() - 2))


def first_order_graph(dy, x, weight, bias, mean, std, use_input_stats, eps, activation,
                      negative_slope, needs):
    """(dx, dweight, dbias) as differentiable functions of dy, x, weight and bias.

    The forward is rebuilt in the statistics' precision: with ``use_input_stats`` the mean and
    variance are recomputed from ``x`` (they depend on it), otherwise ``mean`` and ``std``
    (running statistics, shape (N*C,)) are constants. ``needs`` flags which of x, weight, bias
    want a gradient; the others come back as None.
    """
    acc = mean.dtype
    inputs = [t for t, need in zip((x, weight, bias), needs) if need]
    with torch.enable_grad():
        xa = x.to(acc)
        if use_input_stats:
            var, mu = torch.var_mean(xa, tuple(range(2, x.dim())), correction=0, keepdim=True)
            z = (xa - mu) * torch.rsqrt(var + eps)
        else:
            shape = x.shape[:2] + (1,) * (x.dim() - 2)
            z = (xa - mean.view(shape)) / std.view(shape)
        if weight is not None:
            z = z * _per_channel_view(weight, x).to(acc)
        if bias is not None:
            z = z + _per_channel_view(bias, x).to(acc)
        z = apply_activation(z, activation, negative_slope)
        grads = iter(torch.autograd.grad(z, inputs, dy.to(acc), create_graph=True))
    return tuple(next(grads) if need else None for need in needs)
