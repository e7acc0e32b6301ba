"""Adaptive instance normalization: per-sample affine, and Huang & Belongie's AdaIN.

``adaptive_instance_norm(x, scale, shift)`` is instance norm whose affine parameters are given
per sample, shape (N, C) (or (1, C), broadcast over the batch): StyleGAN / StarGAN v2 style
conditioning. It is the same single forward launch as ``instance_norm``: the kernel indexes its
scale and shift by (n, c) with a zero batch stride for per-channel parameters.

``adain(content, style)`` normalizes the content per (n, c) and re-scales it with the style's
per-(n, c) mean and standard deviation (Huang & Belongie 2017, eq. 8):

    AdaIN(x, s) = sigma(s) * (x - mu(x)) / sigma(x) + mu(s)

Both sigmas are ``sqrt(biased variance + eps)``, the same estimator instance norm uses: then
``adain(x, x) == x`` (up to rounding) and the style statistics match what ``InstanceNorm`` would
remove from the style image. (The authors' reference code uses the unbiased variance for both,
which differs by a factor sqrt(HW / (HW - 1)): noticeable only on tiny feature maps.)
"""

import torch
from torch import Tensor

from . import activations, dispatch, eager, launch, ops
from .arguments import check_args, dtype_name, float_arg
from .functional import register_dtensor_rules


def _check_input(input):
    """instance_norm's checks of an input normalized with its own statistics."""
    if type(input) is not Tensor:
        register_dtensor_rules(input)
    check_args(input, running_mean=None, running_var=None, weight=None, bias=None,
               use_input_stats=True, momentum=0.1, eps=1e-5)


def _check_per_sample(name, t, n, c):
    if t.dim() == 1 and t.shape[0] == c:
        return
    if t.dim() != 2 or t.shape[1] != c or t.shape[0] not in (1, n):
        raise ValueError(f"{name} must have shape (N, C) = ({n}, {c}), (1, {c}) or ({c},); "
                         f"got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {dtype_name(t.dtype)}")


def adaptive_instance_norm(input: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5,
                           activation: str | None = None, negative_slope: float = 0.01) -> Tensor:
    """``instance_norm(input) * scale[n, c] + shift[n, c]``, then the optional activation.

    Differentiable with respect to input, scale and shift; one forward launch.
    """
    act = activations.code(activation)
    _check_input(input)
    eps = float_arg("adaptive_instance_norm", "eps", 4, eps)
    negative_slope = float_arg("adaptive_instance_norm", "negative_slope", 6, negative_slope)
    n, c = input.shape[0], input.shape[1]
    _check_per_sample("scale", scale, n, c)
    _check_per_sample("shift", shift, n, c)
    route = dispatch.route(input, scale, shift)
    if route == dispatch.TORCH:
        return eager.adaptive_instance_norm(input, scale, shift, eps, act, negative_slope)
    if input.numel() == 0:
        return input.clone()
    y, _ = ops.forward(launch.kernel_layout(input), scale, shift, None, None, use_input_stats=True,
                       eps=eps, activation=act, negative_slope=negative_slope,
                       eager=route == dispatch.EAGER)
    return y


def instance_stats(input: Tensor, eps: float = 1e-5):
    """(mean, std) per (n, c), shape (N, C), std = sqrt(biased var + eps); differentiable."""
    _check_input(input)
    eps = float_arg("instance_stats", "eps", 2, eps)
    route = dispatch.route(input)
    if route == dispatch.TORCH:
        return eager.instance_stats(input, eps)
    mean, std, _ = ops.plane_stats(input, eps=eps, eager=route == dispatch.EAGER)
    return mean, std


def adain(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN(content, style): differentiable with respect to both (see the module docstring)."""
    if content.dim() < 3 or style.dim() != content.dim() or style.shape[:2] != content.shape[:2]:
        raise ValueError(f"content and style must be (N, C, *spatial) with the same N, C and "
                         f"number of dims; got {tuple(content.shape)} and {tuple(style.shape)}")
    eps = float_arg("adain", "eps", 3, eps)
    mean, std = instance_stats(style, eps)
    return adaptive_instance_norm(content, std, mean, eps)


class AdaptiveInstanceNorm2d(torch.nn.Module):
    """Instance norm with per-sample affine given at call time: ``forward(x, scale, shift)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, activation: str | None = None,
                 negative_slope: float = 0.01) -> None:
        super().__init__()
        activations.code(activation)
        self.num_features = num_features
        self.eps = eps
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if input.dim() not in (3, 4):
            raise ValueError(f"expected 3D or 4D input (got {input.dim()}D input)")
        if input.dim() == 3:
            return self.forward(input.unsqueeze(0), scale.reshape(1, -1),
                                shift.reshape(1, -1)).squeeze(0)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input's size at dim=1 to match num_features "
                             f"({self.num_features}), but got: {input.shape[1]}.")
        return adaptive_instance_norm(input, scale, shift, self.eps, self.activation,
                                      self.negative_slope)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s


class AdaIN(torch.nn.Module):
    """``forward(content, style)``: Huang & Belongie's adaptive instance normalization."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        return adain(content, style, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
