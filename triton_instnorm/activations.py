"""The activations a layer fuses (``activation=``), one row each.

A row says everything the package knows about one activation:

- ``name``: what ``activation=`` takes (None: no activation);
- ``code``: the kernels' ``ACTIVATION`` constexpr (``kernels/constants.py``), which selects the
  forward in ``_activate`` and its derivative in ``_activation_grad`` (``kernels/common.py``);
- ``eager``: the same function in PyTorch ops, ``eager(y, negative_slope)``: the layers'
  computation wherever torch's ops compute (``eager.py``) and the double-backward graph;
- ``onnx``: its ONNX form, ``onnx(builder, y, dtype, negative_slope)`` (``onnx_export.py``);
- ``module``: the torch module that computes it, which activation fusion moves into a norm;
- ``slope``: it reads ``negative_slope``.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import nn

from .kernels import constants


@dataclass(frozen=True)
class Activation:
    name: str | None
    code: int
    eager: Callable
    onnx: Callable
    module: type | None
    slope: bool = False


def _gelu_onnx(b, y, dtype, negative_slope):
    if b.opset >= 20:
        return b.op("Gelu", y, approximate="none")
    erf = b.op("Erf", b.op("Mul", y, b.constant(math.sqrt(0.5), dtype)))  # the exact (erf) form
    half_y = b.op("Mul", y, b.constant(0.5, dtype))
    return b.op("Add", half_y, b.op("Mul", half_y, erf))


TABLE = (
    Activation(None, constants.ACT_NONE, lambda y, s: y, lambda b, y, dtype, s: y, None),
    Activation("relu", constants.ACT_RELU, lambda y, s: F.relu(y),
               lambda b, y, dtype, s: b.op("Relu", y), nn.ReLU),
    Activation("leaky_relu", constants.ACT_LEAKY_RELU, F.leaky_relu,
               lambda b, y, dtype, s: b.op("LeakyRelu", y, alpha=float(s)), nn.LeakyReLU,
               slope=True),
    Activation("silu", constants.ACT_SILU, lambda y, s: F.silu(y),
               lambda b, y, dtype, s: b.op("Mul", y, b.op("Sigmoid", y)), nn.SiLU),
    Activation("gelu", constants.ACT_GELU, lambda y, s: F.gelu(y), _gelu_onnx, nn.GELU),
)
BY_NAME = {a.name: a for a in TABLE}
BY_CODE = {a.code: a for a in TABLE}
_BY_MODULE = {a.module: a for a in TABLE if a.module is not None}


def code(activation) -> int:
    """The kernel code of the activation named ``activation``, or ValueError."""
    try:
        return BY_NAME[activation].code
    except (KeyError, TypeError):  # (TypeError: an unhashable value)
        allowed = ", ".join(repr(a.name) for a in TABLE)
        raise ValueError(f"activation must be one of {allowed}; got {activation!r}") from None


def apply_activation(y, activation, negative_slope: float):
    """``activation`` (a name or a kernel code) applied to ``y`` with PyTorch's ops."""
    row = BY_CODE[activation] if isinstance(activation, int) else BY_NAME[activation]
    return row.eager(y, negative_slope)


def of_module(m: nn.Module, cls: type | None = None):
    """(name, negative_slope) of the activation the module ``m`` computes (as an instance of
    ``cls``, its class by default), if fusion can move it into a norm (GELU in its exact form
    only), else None."""
    row = _BY_MODULE.get(type(m) if cls is None else cls)
    if row is None or getattr(m, "approximate", "none") != "none":
        return None
    return row.name, float(m.negative_slope) if row.slope else 0.01
