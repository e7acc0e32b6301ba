"""ONNX export: our custom ops translate to standard ONNX with both of torch's exporters.

Importing ``triton_instnorm`` registers the translations, so ``torch.onnx.export`` of a model
holding our layers (converted or built directly) needs no extra argument, and onnxruntime runs
the file with no custom domain:

- ``forward`` becomes ``InstanceNormalization`` (``BatchNormalization`` in inference form when it
  normalizes with given running statistics), then ``Mul`` / ``Add`` for per-sample (N, C) or
  (1, C) affine parameters (``adaptive_instance_norm``, ``adain``), then the fused activation
  (``Relu``, ``LeakyRelu``, ``x * Sigmoid(x)``, ``Gelu`` or its erf form before opset 20);
- ``plane_stats`` (AdaIN's style statistics) becomes global average pools: mean and
  ``sqrt(biased var + eps)``;
- ``update_running_stats`` is not exported: an ONNX graph holds no state, and torch's own
  instance norm leaves its running-stat update out of exported graphs too. ``instance_norm``
  does not emit it while ``torch.onnx.is_in_onnx_export()`` (the dynamo exporter cannot
  translate an in-place custom op); the TorchScript symbolic drops it from graphs that hold it.
  An ``ExportedProgram`` captured in training mode with running statistics therefore does not
  export with ``dynamo=True``: capture it in eval mode, as an inference graph wants.

How each exporter is reached:

- TorchScript exporter (``dynamo=False``): ``torch.onnx.register_custom_op_symbolic``, its public
  registration for custom ops.
- Dynamo exporter (``dynamo=True``, also for an ``ExportedProgram`` holding our ops): it has no
  global registry for custom ops (only the per-call ``custom_translation_table``), but before
  translating it decomposes every op it cannot translate with a table it builds for that export
  (``torch.onnx._internal.exporter._decomp.create_onnx_friendly_decomposition_table``). We wrap
  that builder so the table also holds our ops' decompositions into the aten ops torch exports
  for its own instance norm. Nothing is added to torch's global decomposition registry: inductor
  treats an op with a registered decomposition as a mistake when it falls back to the op (an
  error when the ``CI`` environment variable is set), and FakeTensor and ``make_fx`` read that
  registry too. Where the builder is missing (another torch layout), ``dynamo=True`` export of
  our ops fails with the exporter's own error; the TorchScript exporter still works.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch.onnx import symbolic_helper

from . import launch, ops  # noqa: F401  (ops registers the custom ops translated here)
from .kernels import constants
from .eager import ACTIVATION_NAMES, TORCH_INSTANCE_NORM, per_channel_view, apply_activation

_OPS = torch.ops.triton_instnorm
_SYMBOLIC_OPSET = 9  # the oldest opset with every ONNX operator used below (Erf)
_ONNX_DTYPES = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
                "Double": torch.float64}
_ONNX_TYPE_CODES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


# --- dynamo exporter: decompositions into aten ops -----------------------------------------------

def forward_composition(x, weight, bias, running_mean, running_var, use_input_stats, eps,
                        activation, negative_slope, store_stats):
    """``triton_instnorm::forward`` from the aten ops torch exports for its own instance norm.
    The statistics output is zeros of its shape: only the running-stat update reads it."""
    per_channel = [p.to(x.dtype) if p is not None and p.dim() == 1 else None for p in (weight, bias)]
    if use_input_stats:
        y = TORCH_INSTANCE_NORM(x, None, None, *per_channel, True, 0.0, eps)
    else:
        y = F.batch_norm(x, running_mean.to(x.dtype), running_var.to(x.dtype), *per_channel,
                         False, 0.0, eps)
    if weight is not None and weight.dim() == 2:
        y = y * per_channel_view(weight, x).to(x.dtype)
    if bias is not None and bias.dim() == 2:
        y = y + per_channel_view(bias, x).to(x.dtype)
    stats = x.new_zeros((constants.NUM_STATS, x.shape[0] * x.shape[1]) if store_stats else (0,),
                        dtype=launch.acc_dtype(x.dtype))
    return apply_activation(y, activation, negative_slope), stats


def plane_stats_composition(x, eps):
    """``triton_instnorm::plane_stats``; its statistics buffer (read only by the backward) is
    zeros of its shape, as in the forward's composition."""
    acc = launch.acc_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(acc), tuple(range(2, x.dim())), correction=0)
    stats = x.new_zeros((constants.NUM_STATS, x.shape[0] * x.shape[1]), dtype=acc)
    return mean, torch.sqrt(var + eps), stats


def _with_our_decompositions(create_table):
    """The dynamo exporter's table builder, with our ops' compositions added (unless the exporter
    has a translation of its own for one of them)."""

    @functools.wraps(create_table)
    def create(onnx_registered_ops, *args, **kwargs):
        table = create_table(onnx_registered_ops, *args, **kwargs)
        table.update({op: composition for op, composition in _DECOMPOSITIONS.items()
                      if op not in onnx_registered_ops})
        return table

    create.wraps_triton_instnorm = True
    return create


def _register_decompositions():
    try:
        from torch.onnx._internal.exporter import _decomp
    except ImportError:
        return
    create_table = getattr(_decomp, "create_onnx_friendly_decomposition_table", None)
    if create_table is not None and not getattr(create_table, "wraps_triton_instnorm", False):
        _decomp.create_onnx_friendly_decomposition_table = _with_our_decompositions(create_table)


# --- TorchScript exporter: symbolic functions ----------------------------------------------------

def _dtype(value):
    return _ONNX_DTYPES[value.type().scalarType()]


def _cast_like(g, value, like):
    if value.type().scalarType() == like.type().scalarType():
        return value
    return g.op("Cast", value, to_i=_ONNX_TYPE_CODES[_dtype(like)])


def _constant(g, value, dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _channel_params(g, x, weight, bias):
    """(scale, shift) per channel for InstanceNormalization / BatchNormalization, and the
    per-sample (N, C) or (1, C) ones left to apply after it (None where there are none)."""
    channels = symbolic_helper._get_tensor_dim_size(x, 1)
    per_sample = []
    per_channel = []
    for p, fill in ((weight, 1.0), (bias, 0.0)):
        present = not symbolic_helper._is_none(p)
        if present and symbolic_helper._get_tensor_rank(p) == 1:
            per_channel.append(_cast_like(g, p, x))
            per_sample.append(None)
            continue
        if channels is None:
            raise torch.onnx.errors.SymbolicValueError(
                "Unsupported: ONNX export of instance_norm for unknown channel size.", x)
        per_channel.append(_constant(g, [fill] * channels, _dtype(x)))
        per_sample.append(_cast_like(g, p, x) if present else None)
    return per_channel, per_sample


def _per_sample_affine(g, y, rank, scale, shift):
    shape = _constant(g, [0, -1] + [1] * (rank - 2), torch.int64)  # (N or 1, C, 1, ...)
    if scale is not None:
        y = g.op("Mul", y, g.op("Reshape", scale, shape))
    if shift is not None:
        y = g.op("Add", y, g.op("Reshape", shift, shape))
    return y


def _activation(g, y, activation, negative_slope):
    name = ACTIVATION_NAMES[activation]
    if name == "relu":
        return g.op("Relu", y)
    if name == "leaky_relu":
        return g.op("LeakyRelu", y, alpha_f=negative_slope)
    if name == "silu":
        return g.op("Mul", y, g.op("Sigmoid", y))
    if name == "gelu":
        if g.opset >= 20:
            return g.op("Gelu", y, approximate_s="none")
        erf = g.op("Erf", g.op("Mul", y, _constant(g, math.sqrt(0.5), _dtype(y))))
        half_y = g.op("Mul", y, _constant(g, 0.5, _dtype(y)))
        return g.op("Add", half_y, g.op("Mul", half_y, erf))
    return y


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "b", "f", "i", "f", "b")
def forward_symbolic(g, x, weight, bias, running_mean, running_var, use_input_stats, eps,
                     activation, negative_slope, store_stats):
    (scale, shift), per_sample = _channel_params(g, x, weight, bias)
    if use_input_stats:
        y = g.op("InstanceNormalization", x, scale, shift, epsilon_f=eps)
    else:
        y = g.op("BatchNormalization", x, scale, shift, _cast_like(g, running_mean, x),
                 _cast_like(g, running_var, x), epsilon_f=eps)
    y = _per_sample_affine(g, y, symbolic_helper._get_tensor_rank(x), *per_sample)
    stats = _constant(g, [], launch.acc_dtype(_dtype(x)))  # read only by the running-stat update
    return _activation(g, y, activation, negative_slope), stats


@symbolic_helper.parse_args("v", "f")
def plane_stats_symbolic(g, x, eps):
    acc = launch.acc_dtype(_dtype(x))
    x = g.op("Cast", x, to_i=_ONNX_TYPE_CODES[acc]) if acc != _dtype(x) else x
    mean = g.op("GlobalAveragePool", x)
    centered = g.op("Sub", x, mean)
    var = g.op("GlobalAveragePool", g.op("Mul", centered, centered))
    std = g.op("Sqrt", g.op("Add", var, _constant(g, eps, acc)))
    stats = _constant(g, [], acc)  # read only by the backward
    return g.op("Flatten", mean, axis_i=1), g.op("Flatten", std, axis_i=1), stats


def update_running_stats_symbolic(g, *args):
    return None


# --- registration ---------------------------------------------------------------------------------

_DECOMPOSITIONS = {_OPS.forward.default: forward_composition,
                   _OPS.plane_stats.default: plane_stats_composition}
_register_decompositions()

for _op, _symbolic in ((_OPS.forward.default, forward_symbolic),
                       (_OPS.plane_stats.default, plane_stats_symbolic),
                       (_OPS.update_running_stats.default, update_running_stats_symbolic)):
    torch.onnx.register_custom_op_symbolic(_op._schema.name, _symbolic, _SYMBOLIC_OPSET)
