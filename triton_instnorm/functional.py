"""``instance_norm``: the drop-in for ``torch.nn.functional.instance_norm``.

Argument checks mirror PyTorch's (same exception types and messages), then the call goes to the
Triton operators in ``ops.py``. Dispatch:

- CUDA tensors: the compiled Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported: the same kernels, run
  by Triton's interpreter (this is how the test suite runs on machines without a GPU).
- Anything else (CPU without the interpreter, other devices): eager PyTorch, documented fallback.
"""

import math
import os

import torch
from torch import Tensor

from . import launch, ops
from .eager import ACTIVATIONS, TORCH_INSTANCE_NORM, apply_activation

_C10_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int",
    torch.int64: "Long", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.complex32: "ComplexHalf", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernels_available(t: Tensor) -> bool:
    """True when ``t`` is handled by the Triton kernels (see the module docstring)."""
    if t.device.type == "cuda":
        return True
    if t.device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return t.device.type == "meta"


def activation_code(activation) -> int:
    if activation not in ACTIVATIONS:
        allowed = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of {allowed}; got {activation!r}")
    return ACTIVATIONS[activation]


def _dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def check_args(input, running_mean, running_var, weight, bias, use_input_stats, momentum):
    """PyTorch's checks for instance_norm, in PyTorch's order, raising PyTorch's exceptions."""
    if use_input_stats:
        size_prods = 1
        for s in input.shape[2:]:
            size_prods *= s
        if input.dim() < 2 or size_prods == 1:
            raise ValueError(
                f"Expected more than 1 spatial element when training, got input size {input.size()}")
    if momentum is None or not isinstance(momentum, (int, float)):
        raise TypeError(f"instance_norm(): argument 'momentum' (position 7) must be float, "
                        f"not {type(momentum).__name__}")
    if not use_input_stats and (running_mean is None or running_var is None):
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false")
    if input.dim() < 2:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [-{max(input.dim(), 1)}, "
            f"{max(input.dim(), 1) - 1}], but got 1)")
    n, c = input.shape[0], input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.dim() > 1:
            raise RuntimeError("Number of dimensions of repeat dims can not be smaller than number "
                               "of dimensions of tensor")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(f'"batch_norm" not implemented for \'{_dtype_name(input.dtype)}\'')
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.numel() * n != n * c:
            raise RuntimeError(f"{name} should contain {n * c} elements not {t.numel() * n}")
    for t in (running_mean, running_var):
        if t is not None and t.requires_grad:
            raise RuntimeError("The function 'native_batch_norm' is not differentiable with respect "
                               "to argument 'running_mean'. This input cannot have requires_grad True.")
    check_param_dtypes(input, weight, bias)
    for t in (weight, bias, running_mean, running_var):
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} and {t.device}!")


def check_param_dtypes(input, weight, bias):
    """batch_norm's dtype rule for weight and bias: parameters in the input's dtype, or all
    float32 for half / bfloat16 input. CUDA accepts the same combinations (its native kernel wants
    parameters in the input dtype or its accumulation type, cuDNN float32 for half input) but
    words the error by backend; we raise the same RuntimeError with the CPU text. Running
    statistics may have any floating dtype (CPU torch accepts any; cuDNN wants the weight's)."""
    params = [t.dtype for t in (weight, bias) if t is not None]
    if not params or all(d == input.dtype for d in params):
        return
    if input.dtype in (torch.float16, torch.bfloat16) and params[0] == torch.float32:
        if all(d == torch.float32 for d in params):
            return  # mixed precision: half / bfloat16 input, float32 parameters
    elif weight is not None and weight.dtype == input.dtype:
        raise RuntimeError(f"expected scalar type {_C10_NAMES[input.dtype]} but found "
                           f"{_C10_NAMES[bias.dtype]}")
    elif all(d == torch.float32 for d in params):
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")


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
) -> Tensor:
    """Same as ``torch.nn.functional.instance_norm``, computed by the Triton kernels.

    ``activation`` (``None``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``) is applied in the
    kernel after the affine; ``negative_slope`` is leaky_relu's. Running statistics, when given and
    ``use_input_stats`` is true, are updated in place with the batch mean of the per-instance means
    and of the per-instance unbiased variances, blended with ``momentum``.
    """
    act = activation_code(activation)
    check_args(input, running_mean, running_var, weight, bias, use_input_stats, momentum)
    if not kernels_available(input):
        y = TORCH_INSTANCE_NORM(input, running_mean, running_var, weight, bias, use_input_stats,
                                momentum, eps)
        return apply_activation(y, activation, negative_slope)
    # An ONNX graph holds no state: exporting leaves the running-stat update out, as torch's own
    # instance norm does (and the dynamo exporter cannot translate an in-place custom op).
    update = use_input_stats and running_mean is not None and not torch.onnx.is_in_onnx_export()
    if input.numel() == 0:
        return _empty(input, running_mean, running_var, update)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    # A view the kernels cannot read in place is copied here, outside the operator, so that the
    # copy is what autograd saves: the backward then reads it instead of copying x again.
    input = launch.kernel_layout(input)
    y, stats = ops.forward(input, weight, bias, running_mean, running_var, bool(use_input_stats),
                           float(eps), act, float(negative_slope), grad or update)
    if update:
        n, c = input.shape[0], input.shape[1]
        ops.update_running_stats(stats, running_mean, running_var, n, c, math.prod(input.shape[2:]),
                                 float(momentum))
    return y


def _empty(input, running_mean, running_var, update):
    # PyTorch: an empty batch averages nothing (running stats become NaN); empty planes leave
    # the running stats as they are.
    if update and input.shape[0] == 0:
        with torch.no_grad():
            running_mean.fill_(float("nan"))
            running_var.fill_(float("nan"))
    return input.clone()
