"""Drop-in modules: subclasses of ``torch.nn.InstanceNorm1d/2d/3d``.

Subclassing keeps everything a user (or a checkpoint) relies on identical to PyTorch: the
constructor, parameters and buffers, ``state_dict`` keys and versioning, ``repr``, train/eval
behaviour, unbatched inputs, and the errors and warnings for bad input. Only the computation is
swapped: ``_apply_instance_norm`` calls our ``instance_norm``, which launches the Triton kernels.
"""

import torch

from . import activations
from .functional import instance_norm


class _TritonInstanceNorm:
    """What our three classes add to torch's: keyword-only ``activation`` (None, 'relu',
    'leaky_relu', 'silu', 'gelu') and ``negative_slope``, applied in the forward kernel, and the
    computation itself. Listed before torch's class, so ``super()`` reaches torch's constructor."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None, dtype=None,
                 *, bias: bool = True, activation: str | None = None,
                 negative_slope: float = 0.01) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        activations.code(activation)  # ValueError for an unknown name, at construction
        self.activation = activation
        self.negative_slope = negative_slope

    def _apply_instance_norm(self, input):
        return instance_norm(
            input,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            use_input_stats=self.training or not self.track_running_stats,
            # None: never update, as torch
            momentum=self.momentum if self.momentum is not None else 0.0,
            eps=self.eps,
            activation=self.activation,
            negative_slope=self.negative_slope,
        )

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
