"""Drop-in modules: subclasses of ``torch.nn.InstanceNorm1d/2d/3d``.

Subclassing keeps everything a user (or a checkpoint) relies on identical to PyTorch: the
constructor, parameters and buffers, ``state_dict`` keys and versioning, ``repr``, train/eval
behaviour, unbatched inputs, and the errors and warnings for bad input. Only the computation is
swapped: ``_apply_instance_norm`` calls our ``instance_norm``, which launches the Triton kernels.
"""

import torch

from .functional import activation_code, instance_norm


class _TritonInstanceNormMixin:
    def _init_activation(self, activation, negative_slope):
        activation_code(activation)  # ValueError for an unknown name, at construction
        self.activation = activation
        self.negative_slope = negative_slope

    def _apply_instance_norm(self, input):
        return instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,  # None: never update, as torch
            self.eps,
            activation=self.activation,
            negative_slope=self.negative_slope,
        )

    def extra_repr(self):
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        return s


def _make(torch_cls):
    class _Module(_TritonInstanceNormMixin, torch_cls):
        def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                     affine: bool = False, track_running_stats: bool = False, device=None, dtype=None,
                     *, bias: bool = True, activation: str | None = None,
                     negative_slope: float = 0.01) -> None:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                             bias=bias)
            self._init_activation(activation, negative_slope)

    _Module.__name__ = _Module.__qualname__ = torch_cls.__name__
    _Module.__doc__ = (f"Drop-in for :class:`torch.nn.{torch_cls.__name__}` computed by Triton kernels.\n\n"
                       "Same constructor, plus keyword-only ``activation`` (None, 'relu', 'leaky_relu', "
                       "'silu', 'gelu') and ``negative_slope``, applied in the forward kernel.")
    return _Module


InstanceNorm1d = _make(torch.nn.InstanceNorm1d)
InstanceNorm2d = _make(torch.nn.InstanceNorm2d)
InstanceNorm3d = _make(torch.nn.InstanceNorm3d)
