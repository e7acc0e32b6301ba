"""Drop-in modules: subclasses of ``torch.nn.InstanceNorm1d/2d/3d``.

Subclassing keeps everything a user (or a checkpoint) relies on identical to PyTorch: the
constructor, parameters and buffers, ``state_dict`` keys and versioning, ``repr``, train/eval
behaviour, unbatched inputs, and the errors and warnings for bad input. Only the computation is
swapped: ``forward`` makes torch's checks and calls our ``instance_norm``, which launches the
Triton kernels.
"""

import warnings

import torch

from . import activations
from .functional import instance_norm


class _TritonInstanceNorm:
    """What our three classes add to torch's: keyword-only ``activation`` (None, 'relu',
    'leaky_relu', 'silu', 'gelu') and ``negative_slope``, applied in the forward kernel, an
    optional ``residual`` input of the forward, added before the activation in the same kernel
    (``norm(x, residual=skip)``), and the computation itself. Listed before torch's class, so
    ``super()`` reaches torch's constructor."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None, dtype=None,
                 *, bias: bool = True, activation: str | None = None,
                 negative_slope: float = 0.01) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        activations.code(activation)  # ValueError for an unknown name, at construction
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalize(input, residual, self.activation, self.negative_slope)

    def _normalize(self, input, residual, activation, negative_slope):
        """torch's forward (its checks, unbatched input), with ``residual`` added before
        ``activation``. Fusion calls it for a sum whose activation it moves in (fusion.py)."""
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match "
                                 f"num_features ({self.num_features}), but got: "
                                 f"{input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You "
                          "can silence this warning by not passing in num_features, which is not "
                          "used because affine=False", stacklevel=3)
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
            residual = residual.unsqueeze(0) if isinstance(residual, torch.Tensor) else residual
        y = instance_norm(
            input,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            use_input_stats=self.training or not self.track_running_stats,
            # None: never update, as torch
            momentum=self.momentum if self.momentum is not None else 0.0,
            eps=self.eps,
            activation=activation,
            negative_slope=negative_slope,
            residual=residual,
        )
        return y.squeeze(0) if unbatched else y

    def extra_repr(self):
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if activations.BY_NAME[self.activation].slope:
                s += f", negative_slope={self.negative_slope}"
        return s


class InstanceNorm1d(_TritonInstanceNorm, torch.nn.InstanceNorm1d):
    """Drop-in for :class:`torch.nn.InstanceNorm1d` computed by Triton kernels, with
    two more keyword arguments, ``activation`` and ``negative_slope`` (see _TritonInstanceNorm)."""


class InstanceNorm2d(_TritonInstanceNorm, torch.nn.InstanceNorm2d):
    """Drop-in for :class:`torch.nn.InstanceNorm2d` computed by Triton kernels, with
    two more keyword arguments, ``activation`` and ``negative_slope`` (see _TritonInstanceNorm)."""


class InstanceNorm3d(_TritonInstanceNorm, torch.nn.InstanceNorm3d):
    """Drop-in for :class:`torch.nn.InstanceNorm3d` computed by Triton kernels, with
    two more keyword arguments, ``activation`` and ``negative_slope`` (see _TritonInstanceNorm)."""
