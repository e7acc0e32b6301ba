"""``instance_norm``: the drop-in for ``torch.nn.functional.instance_norm``.

Argument checks mirror PyTorch's (same exception types and messages), then the call goes to the
Triton operators in ``ops.py``. Dispatch:

- CUDA tensors: the compiled Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported: the same kernels, run
  by Triton's interpreter (this is how the test suite runs on machines without a GPU).
- Anything else (CPU without the interpreter, other devices): eager PyTorch, documented fallback.
"""

import math
import sys

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import launch, ops
from .eager import ACTIVATIONS, TORCH_INSTANCE_NORM, apply_activation

_C10_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
    torch.int64: "Long", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.complex32: "ComplexHalf", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
}
_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_OPTIONAL_TENSOR = (Tensor, type(None))


def kernels_available(t: Tensor) -> bool:
    """True when ``t`` is handled by the Triton kernels (see the module docstring)."""
    if t.is_cuda:
        return True
    if t.is_cpu:
        return launch.INTERPRETED
    return t.is_meta


def register_dtensor_rules(t) -> None:
    """A DTensor ``t`` finds the operators' rules for DTensors (distributed.py) registered.
    Whoever made a DTensor imported torch.distributed.tensor; this package does not (it takes
    half a second)."""
    if "torch.distributed.tensor" in sys.modules:
        from . import distributed
        distributed.register_rules(t)


def activation_code(activation) -> int:
    if activation not in ACTIVATIONS:
        allowed = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of {allowed}; got {activation!r}")
    return ACTIVATIONS[activation]


def _dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


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


def check_args(input, *, running_mean, running_var, weight, bias, use_input_stats, momentum,
               eps):
    """PyTorch's checks for instance_norm, in PyTorch's order, raising PyTorch's exceptions."""
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
            f'"batch_norm" not implemented for \'{_dtype_name(input.dtype)}\'')
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
        if t.device != device and "meta" in (t.device.type, device.type):
            raise RuntimeError(f"Tensor on device {t.device} is not on the expected device "
                               f"{device}!")
        if t.device != device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{device} and {t.device}!")


def check_param_dtypes(input, weight, bias, running_mean=None, running_var=None):
    """batch_norm's CPU dtype rule. The parameters' dtype is the weight's (else the bias's, else
    the input's). Running statistics in another dtype are converted, so any floating pair passes;
    running statistics in the parameters' dtype are used as they are, so running_var must share
    it. The parameters, and those running statistics, must then be in the input's dtype, or
    all float32 for half / bfloat16 input. CUDA accepts the same combinations (its native kernel
    wants parameters in the input dtype or its accumulation type, cuDNN float32 for half input)
    but words the error by backend; we raise the same RuntimeError with the CPU text."""
    param_dtype = next((t.dtype for t in (weight, bias) if t is not None), input.dtype)
    params = [t.dtype for t in (weight, bias) if t is not None]
    if running_mean is not None and running_mean.dtype == param_dtype:
        params.append(running_var.dtype)
    if param_dtype == input.dtype:
        for dtype in params:
            if dtype != input.dtype:
                raise RuntimeError(f"expected scalar type {_C10_NAMES[input.dtype]} but found "
                                   f"{_C10_NAMES[dtype]}")
        return
    if any(d != torch.float32 for d in params):
        raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    if input.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    negative_slope: float = 0.01,
    residual: Tensor | None = None,
) -> Tensor:
    """Same as ``torch.nn.functional.instance_norm``, computed by the Triton kernels.

    ``activation`` (``None``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``) is applied in
    the kernel after the affine; ``negative_slope`` is leaky_relu's. ``residual``, a tensor of
    the input's shape, dtype and device, is added before the activation in the same kernel:
    ``act(instance_norm(x) + residual)``, the end of a residual block, with no separate add
    (rounded once to the output dtype). Running statistics, when
    given and ``use_input_stats`` is true, are updated in place with the batch mean of the
    per-instance means and of the per-instance unbiased variances, blended with ``momentum``.
    Arguments are taken as torch takes them (numpy scalars and 0-dim tensors for the floats,
    0-dim parameters when C == 1), with torch's errors for the rest.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias, residual):
        # tensor subclasses and torch function modes first, as torch's function does
        return handle_torch_function(
            instance_norm, (input, running_mean, running_var, weight, bias, residual), input,
            running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
            use_input_stats=use_input_stats, momentum=momentum, eps=eps, activation=activation,
            negative_slope=negative_slope, residual=residual)
    if type(input) is not Tensor:
        register_dtensor_rules(input)
    act = activation_code(activation)
    check_args(input, running_mean=running_mean, running_var=running_var, weight=weight,
               bias=bias, use_input_stats=use_input_stats, momentum=momentum, eps=eps)
    if residual is not None:
        _check_residual(input, residual)
    if type(momentum) is not float:
        momentum = _as_float(momentum)
    if type(eps) is not float:
        eps = _as_float(eps)
    if type(negative_slope) is not float:
        negative_slope = float_arg("instance_norm", "negative_slope", None, negative_slope)
    if not kernels_available(input) or (running_mean is not None and (
            running_mean.is_complex() or running_var.is_complex())):
        # (complex running statistics: torch takes their real part, warns and writes them back)
        y = TORCH_INSTANCE_NORM(input, running_mean, running_var, weight, bias, use_input_stats,
                                momentum, eps)
        return apply_activation(y if residual is None else y + residual, activation,
                                negative_slope)
    # An ONNX graph holds no state: exporting leaves the running-stat update out, as torch's own
    # instance norm does (and the dynamo exporter cannot translate an in-place custom op).
    update = use_input_stats and running_mean is not None and (
        ops.plain_eager(input) or not torch.onnx.is_in_onnx_export())
    n = input.shape[0]
    if n == 0 and (weight is not None or bias is not None):
        # torch's batch norm of an empty input takes weight[0] of the weight repeated N times
        raise IndexError("select(): index 0 out of range for tensor of size [0] at dimension 0")
    # A 0-dim parameter (C == 1, as torch takes it) is read as its one-element view.
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
    if input.numel() == 0:
        return _empty(input, running_mean, running_var, update)
    grad = torch.is_grad_enabled() and (
        input.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad))
    # A view the kernels cannot read in place is copied here, outside the operator, so that the
    # copy is what autograd saves: the backward then reads it instead of copying x again.
    input = launch.kernel_layout(input)
    if residual is not None:
        residual = launch.kernel_layout(residual)
    y, stats = ops.forward(input, weight, bias, running_mean, running_var,
                           use_input_stats=use_input_stats, eps=eps, activation=act,
                           negative_slope=negative_slope, store_stats=grad or update,
                           residual=residual)
    if update:
        ops.update_running_stats(stats, running_mean, running_var, n=n, c=input.shape[1],
                                 hw=math.prod(input.shape[2:]), momentum=momentum)
    return y


def _check_residual(input, residual):
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


def _empty(input, running_mean, running_var, update):
    # As torch: an empty batch averages nothing, so the running statistics become NaN; empty
    # planes (N > 0) leave them as they are.
    if update and input.shape[0] == 0:
        with torch.no_grad():
            running_mean.fill_(float("nan"))
            running_var.fill_(float("nan"))
    return input.clone()


def _overlaps(t):
    """Several elements of the 1-d ``t`` share memory (an expanded tensor)."""
    return t.numel() > 1 and 0 in t.stride()


def _fail_as_torch(input, running_mean, running_var, momentum, eps, *, mean_written, error):
    """Training with running statistics torch cannot write back: torch computes the output,
    updates running_mean when it can (``mean_written``), then raises ``error`` on the first one
    it cannot write. The same side effect, then the same error."""
    if mean_written:
        with torch.no_grad():
            instance_norm(input, running_mean, running_var.new_empty(running_mean.shape),
                          momentum=momentum, eps=eps)
    raise RuntimeError(error)
