"""ONNX translations of our operators, for graphs captured before the export.

A model exported to ONNX never holds our operators: while an exporter traces
(``torch.onnx.is_in_onnx_export()``) the layers compute with torch's own ops (``dispatch.route``),
which both exporters translate to standard ONNX, and torch's model and ours export alike. A graph
captured earlier holds them, and exports with the translations here, to the standard operators
onnxruntime runs with no custom domain:

- ``forward`` becomes ``InstanceNormalization`` (``BatchNormalization`` in inference form when it
  normalizes with given running statistics), then ``Mul`` / ``Add`` for per-sample (N, C) or
  (1, C) affine parameters (``adaptive_instance_norm``, ``adain``), an ``Add`` of the residual
  when one is given, then the activation's ONNX form (``activations.py``);
- ``plane_stats`` (AdaIN's style statistics) becomes global average pools: mean and
  ``sqrt(biased var + eps)``;
- ``update_running_stats`` is not exported: an ONNX graph holds no state. An ``ExportedProgram``
  captured in training mode with running statistics therefore does not export: capture it in
  eval mode, as an inference graph wants.

Which graphs, through public API only (importing ``triton_instnorm`` changes nothing inside
torch):

- an ``ExportedProgram`` (``torch.export.export``), with the dynamo exporter: it has no global
  registry for custom ops, only the per-call ``custom_translation_table``, which
  ``onnx_translation_table()`` fills: ``torch.onnx.export(ep, args, path,
  custom_translation_table=triton_instnorm.onnx_translation_table())``;
- a ``ScriptModule`` from ``torch.jit.trace``, with the TorchScript exporter (``dynamo=False``):
  ``torch.onnx.register_custom_op_symbolic``, its registration for custom ops, done at import.

Both exporters build the same graph from one description (``_forward``, ``_plane_stats``),
written against ``_Builder``: TorchScript's ``g.op`` or ONNX Script's opset.
"""

import torch
from torch.onnx import symbolic_helper

from . import launch, ops  # noqa: F401  (ops registers the custom ops translated here)
from .activations import BY_CODE

_OPS = torch.ops.triton_instnorm
_SYMBOLIC_OPSET = 9  # the oldest opset with every ONNX operator used below (Erf)
_DYNAMO_OPSET = 18  # the ONNX Script opset the dynamo translations are written in
_ONNX_DTYPES = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
                "Double": torch.float64}
_ONNX_TYPE_CODES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16,
                    torch.int64: 7}
_TORCH_DTYPES = {code: dtype for dtype, code in _ONNX_TYPE_CODES.items()}


# --- the graphs, for either exporter -------------------------------------------------------------

class _Builder:
    """What the graphs below need from an exporter: ``op(name, *inputs, **attributes)`` adds a
    node, ``constant`` a tensor of Python values, and the graph inputs' dtype, rank and presence
    (node outputs may carry no dtype yet)."""

    opset: int

    def op(self, name, *inputs, **attributes):
        raise NotImplementedError

    def constant(self, values, dtype: torch.dtype):
        raise NotImplementedError

    def dtype(self, value) -> torch.dtype:
        raise NotImplementedError

    def rank(self, value) -> int:
        raise NotImplementedError

    def is_none(self, value) -> bool:
        raise NotImplementedError

    def channel_fill(self, x, fill: float):
        """A (C,) tensor of ``fill`` in x's dtype, C = x.shape[1]."""
        raise NotImplementedError


def _cast_like(b: _Builder, value, like):
    if b.dtype(value) == b.dtype(like):
        return value
    return b.op("Cast", value, to=_ONNX_TYPE_CODES[b.dtype(like)])


def _channel_params(b: _Builder, x, weight, bias):
    """(scale, shift) per channel for InstanceNormalization / BatchNormalization, and the
    per-sample (N, C) or (1, C) ones left to apply after it (None where there are none)."""
    per_sample = []
    per_channel = []
    for p, fill in ((weight, 1.0), (bias, 0.0)):
        present = not b.is_none(p)
        if present and b.rank(p) == 1:
            per_channel.append(_cast_like(b, p, x))
            per_sample.append(None)
        else:
            per_channel.append(b.channel_fill(x, fill))
            per_sample.append(_cast_like(b, p, x) if present else None)
    return per_channel, per_sample


def _per_sample_affine(b: _Builder, y, rank, scale, shift):
    shape = b.constant([0, -1] + [1] * (rank - 2), torch.int64)  # (N or 1, C, 1, ...)
    if scale is not None:
        y = b.op("Mul", y, b.op("Reshape", scale, shape))
    if shift is not None:
        y = b.op("Add", y, b.op("Reshape", shift, shape))
    return y


def _forward(b: _Builder, x, weight, bias, running_mean, running_var, use_input_stats, eps,
             activation, negative_slope, residual=None):
    """``triton_instnorm::forward``: (y, a placeholder for the statistics, which only the
    running-stat update reads)."""
    (scale, shift), per_sample = _channel_params(b, x, weight, bias)
    if use_input_stats:
        y = b.op("InstanceNormalization", x, scale, shift, epsilon=float(eps))
    else:
        y = b.op("BatchNormalization", x, scale, shift, _cast_like(b, running_mean, x),
                 _cast_like(b, running_var, x), epsilon=float(eps))
    y = _per_sample_affine(b, y, b.rank(x), *per_sample)
    if residual is not None and not b.is_none(residual):
        y = b.op("Add", y, residual)
    stats = b.constant([], launch.acc_dtype(b.dtype(x)))
    return BY_CODE[activation].onnx(b, y, b.dtype(x), negative_slope), stats


def _plane_stats(b: _Builder, x, eps):
    """``triton_instnorm::plane_stats``: (mean, std) of shape (N, C) and a placeholder for the
    statistics, which only the backward reads."""
    acc = launch.acc_dtype(b.dtype(x))
    x = b.op("Cast", x, to=_ONNX_TYPE_CODES[acc]) if acc != b.dtype(x) else x
    mean = b.op("GlobalAveragePool", x)
    centered = b.op("Sub", x, mean)
    var = b.op("GlobalAveragePool", b.op("Mul", centered, centered))
    std = b.op("Sqrt", b.op("Add", var, b.constant(float(eps), acc)))
    stats = b.constant([], acc)
    return b.op("Flatten", mean, axis=1), b.op("Flatten", std, axis=1), stats


# --- TorchScript exporter: symbolic functions ----------------------------------------------------

class _TorchScriptBuilder(_Builder):
    _SUFFIXES = {float: "f", int: "i", str: "s"}

    def __init__(self, g):
        self.g = g
        self.opset = g.opset

    def op(self, name, *inputs, **attributes):
        named = {f"{k}_{self._SUFFIXES[type(v)]}": v for k, v in attributes.items()}
        return self.g.op(name, *inputs, **named)

    def constant(self, values, dtype):
        return self.g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

    def dtype(self, value):
        return _ONNX_DTYPES[value.type().scalarType()]

    def rank(self, value):
        return symbolic_helper._get_tensor_rank(value)

    def is_none(self, value):
        return symbolic_helper._is_none(value)

    def channel_fill(self, x, fill):
        channels = symbolic_helper._get_tensor_dim_size(x, 1)
        if channels is None:
            raise torch.onnx.errors.SymbolicValueError(
                "Unsupported: ONNX export of instance_norm for unknown channel size.", x)
        return self.constant([fill] * channels, self.dtype(x))


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "b", "f", "i", "f", "v")
def forward_symbolic(g, x, weight, bias, running_mean, running_var, use_input_stats, eps,
                     activation, negative_slope, residual=None):
    return _forward(_TorchScriptBuilder(g), x, weight, bias, running_mean, running_var,
                    use_input_stats, eps, activation, negative_slope, residual)


@symbolic_helper.parse_args("v", "f")
def plane_stats_symbolic(g, x, eps):
    return _plane_stats(_TorchScriptBuilder(g), x, eps)


def update_running_stats_symbolic(g, *args):
    return None


for _op, _symbolic in ((_OPS.forward.default, forward_symbolic),
                       (_OPS.plane_stats.default, plane_stats_symbolic),
                       (_OPS.update_running_stats.default, update_running_stats_symbolic)):
    torch.onnx.register_custom_op_symbolic(_op._schema.name, _symbolic, _SYMBOLIC_OPSET)


# --- dynamo exporter: ONNX Script translations ---------------------------------------------------

class _OnnxScriptBuilder(_Builder):
    """Records nodes in the graph the dynamo exporter is tracing (needs onnxscript)."""

    opset = _DYNAMO_OPSET

    def __init__(self):
        import onnx_ir
        from onnxscript import opset18

        self._ir, self._opset = onnx_ir, opset18

    def op(self, name, *inputs, **attributes):
        return getattr(self._opset, name)(*inputs, **attributes)

    def constant(self, values, dtype):
        data_type = self._ir.DataType(_ONNX_TYPE_CODES[dtype])
        return self._opset.Constant(value=self._ir.tensor(values, dtype=data_type))

    def dtype(self, value):
        return _TORCH_DTYPES[int(value.dtype)]

    def rank(self, value):
        return len(value.shape)

    def is_none(self, value):
        return value is None

    def channel_fill(self, x, fill):
        channels = self._opset.Shape(x, start=1, end=2)
        return self._opset.Expand(self.constant(fill, self.dtype(x)), channels)


# Traced translations: unannotated parameters are the op's inputs, annotated ones its attributes.
def forward_translation(x, weight=None, bias=None, running_mean=None, running_var=None,
                        use_input_stats: bool = True, eps: float = 1e-5, activation: int = 0,
                        negative_slope: float = 0.01, residual=None):
    return _forward(_OnnxScriptBuilder(), x, weight, bias, running_mean, running_var,
                    use_input_stats, eps, activation, negative_slope, residual)


def plane_stats_translation(x, eps: float = 1e-5):
    return _plane_stats(_OnnxScriptBuilder(), x, eps)


def onnx_translation_table() -> dict:
    """The ``custom_translation_table`` with which the dynamo exporter translates our operators in
    an ``ExportedProgram`` captured before the export (a model itself exports without it; see the
    module docstring); a new dict on each call::

        ep = torch.export.export(model.eval(), (x,))
        torch.onnx.export(ep, (x,), "model.onnx",
                          custom_translation_table=triton_instnorm.onnx_translation_table())
    """
    return {_OPS.forward.default: forward_translation,
            _OPS.plane_stats.default: plane_stats_translation}
