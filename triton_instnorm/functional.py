"""``instance_norm``: the drop-in for ``torch.nn.functional.instance_norm``.

torch's argument rules (``arguments.py``) raise torch's errors, then the call goes where
``dispatch.route`` sends it:

- CUDA tensors: the compiled Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported: the same kernels, run
  by Triton's interpreter (this is how the test suite runs on machines without a GPU).
- Anything else (CPU without the interpreter, other devices), and calls the kernels do not
  compute (the ONNX exporters, ``torch.func`` transforms, forward-mode AD): torch's own ops
  (``eager.py``).
"""

import math
import sys

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import activations, arguments, dispatch, eager, launch, ops
from .activations import apply_activation  # noqa: F401  (the activations' eager form)
from .dispatch import kernels_available  # noqa: F401  (public)


def register_dtensor_rules(t) -> None:
    """A DTensor ``t`` finds the operators' rules for DTensors (distributed.py) registered.
    Whoever made a DTensor imported torch.distributed.tensor; this package does not (it takes
    half a second)."""
    if "torch.distributed.tensor" in sys.modules:
        from . import distributed
        distributed.register_rules(t)


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
    act = activations.code(activation)
    momentum, eps, negative_slope = arguments.instance_norm_args(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
        negative_slope)
    if residual is not None:
        arguments.check_residual(input, residual)
    route = dispatch.route(input, weight, bias, running_mean, running_var, residual)
    if route == dispatch.TORCH or (running_mean is not None and (
            running_mean.is_complex() or running_var.is_complex())):
        # (complex running statistics: torch takes their real part, warns and writes them back)
        return eager.instance_norm(input, running_mean, running_var, weight, bias,
                                   use_input_stats, momentum, eps, act, negative_slope, residual)
    update = use_input_stats and running_mean is not None
    weight, bias, running_mean, running_var = arguments.kernel_operands(
        input, weight, bias, running_mean, running_var, update, momentum, eps)
    if input.numel() == 0:
        return _empty(input, running_mean, running_var, update)
    # A view the kernels cannot read in place is copied here, outside the operator, so that the
    # copy is what autograd saves: the backward then reads it instead of copying x again.
    input = launch.kernel_layout(input)
    if residual is not None:
        residual = launch.kernel_layout(residual)
    eager_route = route == dispatch.EAGER
    y, stats = ops.forward(input, weight, bias, running_mean, running_var,
                           use_input_stats=use_input_stats, eps=eps, activation=act,
                           negative_slope=negative_slope, store_stats=update, eager=eager_route,
                           residual=residual)
    if update:
        ops.update_running_stats(stats, running_mean, running_var, n=input.shape[0],
                                 c=input.shape[1], hw=math.prod(input.shape[2:]),
                                 momentum=momentum, eager=eager_route)
    return y


def _empty(input, running_mean, running_var, update):
    # As torch: an empty batch averages nothing, so the running statistics become NaN; empty
    # planes (N > 0) leave them as they are.
    if update and input.shape[0] == 0:
        with torch.no_grad():
            running_mean.fill_(float("nan"))
            running_var.fill_(float("nan"))
    return input.clone()
