"""PyTorch's argument rules for ``instance_norm``, in one place: what torch's argument parser
takes for each argument, the checks torch's instance norm makes (in its order, raising its
exception types with its messages), its dtype rules, and the running statistics torch cannot
write back (the same side effect, then the same error).

``instance_norm_args`` is what ``functional.instance_norm`` calls; ``check_args`` and
``float_arg`` serve the adaptive forms too.
"""

import functools
import math
import sys

import torch
from torch import Tensor

from . import eager

_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_OPTIONAL_TENSOR = (Tensor, type(None))

# c10's names that do not follow from torch's Python names (the legacy scalar type names).
_C10_LEGACY = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
    torch.int64: "Long", torch.float16: "Half", torch.float32: "Float", torch.float64: "Double",
    torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.bfloat16: "BFloat16",
}
_C10_PREFIXES = (("quint", "QUInt"), ("qint", "QInt"), ("uint", "UInt"), ("int", "Int"),
                 ("bits", "Bits"))


@functools.lru_cache(maxsize=None)
def dtype_name(dtype: torch.dtype) -> str:
    """c10's name of ``dtype``, as torch's messages spell it: ``Float``, ``UInt16``,
    ``Float8_e4m3fn``, ``QUInt4x2``. The legacy names are listed; the others follow from the
    Python name (``torch.float8_e4m3fn``) by c10's capitalization."""
    if dtype in _C10_LEGACY:
        return _C10_LEGACY[dtype]
    name = str(dtype).removeprefix("torch.")
    for prefix, c10 in _C10_PREFIXES:
        if name.startswith(prefix):
            return c10 + name[len(prefix):]
    return name[:1].upper() + name[1:]


# --- the argument parser's rules: the Python values a Tensor / bool / float argument takes ------

def _type_name(value) -> str:
    """The type's name as torch's argument parser prints it (CPython's tp_name)."""
    cls = type(value)
    if cls.__module__ == "builtins" or cls.__flags__ & (1 << 9):  # Py_TPFLAGS_HEAPTYPE
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


def _type_error(function, name, position, expected, value):
    where = f" (position {position})" if position else ""
    return TypeError(f"{function}(): argument '{name}'{where} must be {expected}, not "
                     f"{_type_name(value)}")


def _is_numpy_scalar(value) -> bool:
    np = sys.modules.get("numpy")  # no numpy scalar exists unless numpy was imported
    return np is not None and isinstance(value, (np.number, np.bool_))


def _check_float(function, name, position, value):
    """A ``float`` argument of a torch function takes Python and numpy numbers (bool and complex
    included) and 0-dim tensors that do not require grad."""
    if isinstance(value, (float, int, torch.SymFloat, torch.SymInt)) or _is_numpy_scalar(value):
        return
    if isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad:
        if value.is_complex() and value.imag.item() != 0:
            raise RuntimeError("value cannot be converted to type double without overflow")
        return
    raise _type_error(function, name, position, "float", value)


def _as_float(value) -> float:
    """A value _check_float accepted, as a Python float (a complex one by its real part)."""
    if isinstance(value, Tensor) and value.is_complex():
        value = value.real
    return float(value)


def float_arg(function: str, name: str, position, value) -> float:
    """``value`` as torch's argument parser takes a ``float`` argument, or its TypeError."""
    if type(value) is float:
        return value
    _check_float(function, name, position, value)
    return _as_float(value)


def _check_parsed(input, weight, bias, running_mean, running_var, use_input_stats, momentum,
                  eps):
    """The argument parser of ``torch.instance_norm``, in its argument order."""
    for position, name, t in ((1, "input", input), (2, "weight", weight), (3, "bias", bias),
                              (4, "running_mean", running_mean), (5, "running_var", running_var)):
        if not (isinstance(t, Tensor) or (t is None and position > 1)):
            raise _type_error("instance_norm", name, position, "Tensor", t)
    if not isinstance(use_input_stats, (bool, torch.SymBool)):
        raise _type_error("instance_norm", "use_input_stats", 6, "bool", use_input_stats)
    _check_float("instance_norm", "momentum", 7, momentum)
    _check_float("instance_norm", "eps", 8, eps)


# --- torch's instance norm: its checks, in its order ---------------------------------------------

def instance_norm_args(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                       eps, negative_slope=0.01):
    """torch's checks of an ``instance_norm`` call, in torch's order, raising torch's exceptions;
    then (momentum, eps, negative_slope) as Python floats."""
    if use_input_stats:
        size = input.size()
        if math.prod(size[2:]) == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {size}")
    if not (type(use_input_stats) is bool and type(momentum) is float and type(eps) is float
            and type(input) is Tensor and isinstance(weight, _OPTIONAL_TENSOR)
            and isinstance(bias, _OPTIONAL_TENSOR) and isinstance(running_mean, _OPTIONAL_TENSOR)
            and isinstance(running_var, _OPTIONAL_TENSOR)):
        _check_parsed(input, weight, bias, running_mean, running_var, use_input_stats, momentum,
                      eps)
    dim = input.dim()
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false")
    if dim < 2:
        raise IndexError(f"Dimension out of range (expected to be in range of [-{max(dim, 1)}, "
                         f"{max(dim, 1) - 1}], but got 1)")
    params = [(name, t) for name, t in (("weight", weight), ("bias", bias),
                                        ("running_mean", running_mean),
                                        ("running_var", running_var)) if t is not None]
    for _, t in params:
        if t.dim() > 1:
            raise RuntimeError("Number of dimensions of repeat dims can not be smaller than number "
                               "of dimensions of tensor")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f'"batch_norm" not implemented for \'{dtype_name(input.dtype)}\'')
    n, c = input.shape[0], input.shape[1]
    for name, t in params:
        if t.numel() * n != n * c:
            raise RuntimeError(f"{name} should contain {n * c} elements not {t.numel() * n}")
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad):
        name = "running_mean" if running_mean.requires_grad else "running_var"
        raise RuntimeError(f"The function 'native_batch_norm' is not differentiable with respect "
                           f"to argument '{name}'. This input cannot have requires_grad True.")
    check_param_dtypes(input, weight, bias, running_mean, running_var)
    device = input.device
    for _, t in params:
        other = t.device
        if other != device:
            if "meta" in (other.type, device.type):
                raise RuntimeError(f"Tensor on device {other} is not on the expected device "
                                   f"{device}!")
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{device} and {other}!")
    if type(momentum) is not float:
        momentum = _as_float(momentum)
    if type(eps) is not float:
        eps = _as_float(eps)
    if type(negative_slope) is not float:
        negative_slope = float_arg("instance_norm", "negative_slope", None, negative_slope)
    return momentum, eps, negative_slope


def check_args(input, *, running_mean, running_var, weight, bias, use_input_stats, momentum,
               eps):
    """torch's checks of an ``instance_norm`` call (``instance_norm_args``)."""
    instance_norm_args(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                       eps)


def check_residual(input, residual):
    """``residual`` is added element for element: a tensor like the input (no broadcasting,
    no type promotion)."""
    if not isinstance(residual, Tensor):
        raise _type_error("instance_norm", "residual", None, "Tensor", residual)
    if (residual.shape, residual.dtype, residual.device) != (input.shape, input.dtype,
                                                             input.device):
        raise RuntimeError(
            f"residual must have the input's shape, dtype and device: got "
            f"{list(residual.shape)}, {residual.dtype}, {residual.device} for an input of "
            f"{list(input.shape)}, {input.dtype}, {input.device}")


def check_param_dtypes(input, weight, bias, running_mean=None, running_var=None):
    """batch_norm's CPU dtype rule. The parameters' dtype is the weight's (else the bias's, else
    the input's). Running statistics in another dtype are converted, so any floating pair passes;
    running statistics in the parameters' dtype are used as they are, so running_var must share
    it. The parameters, and those running statistics, must then be in the input's dtype, or
    all float32 for half / bfloat16 input. CUDA accepts the same combinations (its native kernel
    wants parameters in the input dtype or its accumulation type, cuDNN float32 for half input)
    but words the error by backend; we raise the same RuntimeError with the CPU text."""
    dtype = input.dtype
    if ((weight is None or weight.dtype == dtype) and (bias is None or bias.dtype == dtype)
            and (running_mean is None or (running_mean.dtype == dtype
                                          and running_var.dtype == dtype))):
        return  # everything in the input's dtype (the common case, accepted)
    param_dtype = next((t.dtype for t in (weight, bias) if t is not None), input.dtype)
    params = [t.dtype for t in (weight, bias) if t is not None]
    if running_mean is not None and running_mean.dtype == param_dtype:
        params.append(running_var.dtype)
    if param_dtype == input.dtype:
        for dtype in params:
            if dtype != input.dtype:
                raise RuntimeError(f"expected scalar type {dtype_name(input.dtype)} but found "
                                   f"{dtype_name(dtype)}")
        return
    if any(d != torch.float32 for d in params):
        raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    if input.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")


# --- what the kernels are given: the same tensors, as torch reads and writes them ----------------

def kernel_operands(input, weight, bias, running_mean, running_var, update, momentum, eps):
    """(weight, bias, running_mean, running_var) as the kernels read them: 0-dim parameters and
    statistics (C == 1, which torch takes) as one-element views. Raises torch's error for what
    torch cannot do: weight or bias of an empty batch, and running statistics to ``update`` that
    are 0-dim or overlap (expanded ones), after torch's side effect."""
    if input.shape[0] == 0 and (weight is not None or bias is not None):
        # torch's batch norm of an empty input takes weight[0] of the weight repeated N times
        raise IndexError("select(): index 0 out of range for tensor of size [0] at dimension 0")
    if weight is not None and weight.dim() == 0:
        weight = weight.view(1)
    if bias is not None and bias.dim() == 0:
        bias = bias.view(1)
    if running_mean is not None and (running_mean.dim() == 0 or running_var.dim() == 0):
        if update:  # torch cannot copy the (1,) batch statistics into a 0-dim one
            _fail_as_torch(input, running_mean, running_var, momentum, eps,
                           mean_written=running_mean.dim() == 1,
                           error="output with shape [] doesn't match the broadcast shape [1]")
        running_mean, running_var = running_mean.reshape(1), running_var.reshape(1)
    if update and (_overlaps(running_mean) or _overlaps(running_var)):
        _fail_as_torch(input, running_mean, running_var, momentum, eps,
                       mean_written=not _overlaps(running_mean),
                       error="unsupported operation: more than one element of the written-to "
                       "tensor refers to a single memory location. Please clone() the tensor "
                       "before performing the operation.")
    return weight, bias, running_mean, running_var


def _overlaps(t):
    """Several elements of the 1-d ``t`` share memory (an expanded tensor)."""
    return t.numel() > 1 and 0 in t.stride()


def _fail_as_torch(input, running_mean, running_var, momentum, eps, *, mean_written, error):
    """Training with running statistics torch cannot write back: torch computes the output,
    updates running_mean when it can (``mean_written``), then raises ``error`` on the first one
    it cannot write. The same side effect (by torch's function), then the same error."""
    if mean_written:
        with torch.no_grad():
            eager.TORCH_INSTANCE_NORM(input, running_mean, running_mean.new_empty(
                running_mean.shape), momentum=momentum, eps=eps)
    raise RuntimeError(error)
