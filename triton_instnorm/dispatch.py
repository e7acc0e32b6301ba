"""Where each call of a layer goes (``route``).

- ``TORCH``: torch's own ops compute it (``eager.py``) where the kernels do not run (other
  devices, a CPU without the interpreter), while the ONNX exporters trace (ONNX has
  ``InstanceNormalization`` and every activation, which both exporters translate), under
  ``torch.func`` transforms (vmap, grad, jvp, ...: torch's batching and derivative rules, running
  statistics included) and with forward-mode AD tangents. The custom ops have no forward-mode
  formula and no batching rule for an in-place update; torch's function has both.
- ``OPERATORS``: everything else that traces, transforms or intercepts the call (compile, export,
  ``make_fx`` and other dispatch modes, tensor subclasses and fake tensors, TorchScript tracing,
  meta tensors) sees the operators.
- ``EAGER``: in plain eager mode the layers skip the dispatcher (its schema defaults, Python
  autograd wrapper and ``torch._dynamo`` disable wrapper cost tens of microseconds, several times
  what the kernel takes on a GPU; ``python -m perf.overhead``): ``ops.py`` calls a plain
  ``torch.autograd.Function`` with the operators' own autograd formula, or the launch itself
  when no gradient is needed (the statistics then written only if the caller reads them).
  Autograd sees what it sees for the operator: the same saved tensors, version-counter checks
  and non-differentiable statistics, and a bumped version on the mutated running statistics.
"""

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import launch

EAGER, OPERATORS, TORCH = "eager", "operators", "torch"  # the routes (module docstring)

_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def kernels_available(t: Tensor) -> bool:
    """The Triton kernels handle tensors like ``t``: CUDA tensors (compiled), CPU tensors when
    ``TRITON_INTERPRET=1`` was set before triton was imported (Triton's interpreter), and meta
    tensors (shapes only)."""
    if t.is_cuda:
        return True
    if t.is_cpu:
        return launch.INTERPRETED
    return t.is_meta


def route(*tensors) -> str:
    """Where a call with these tensors goes (module docstring): ``TORCH`` where the kernels do not
    run (``kernels_available``), while an ONNX exporter traces, under ``torch.func`` transforms
    and with forward-mode AD tangents; ``EAGER`` for plain tensors (no subclass, fake or meta
    tensor, nor one left over from a ``torch.func`` transform) in plain eager mode; ``OPERATORS``
    for everything else that compiles, exports, traces or intercepts (dispatch or torch-function
    modes) the call."""
    if (torch.compiler.is_compiling()  # first: dynamo traces this function too
            or torch._C._is_tracing()
            or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        if _torch_computes(tensors) or not kernels_available(tensors[0]):
            return TORCH
        return OPERATORS
    if forward_ad._current_level >= 0 and _has_tangent(tensors):
        return TORCH
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or _functorch_wrapped(t)):
            return OPERATORS
    if not kernels_available(tensors[0]):
        return TORCH
    return OPERATORS if tensors[0].is_meta else EAGER


def _torch_computes(tensors) -> bool:
    if torch.onnx.is_in_onnx_export():
        return True
    if torch.compiler.is_compiling():
        return False
    return (torch._C._are_functorch_transforms_active()
            or (forward_ad._current_level >= 0 and _has_tangent(tensors)))


def _has_tangent(tensors) -> bool:
    """A forward-mode AD tangent rides on one of the tensors (a dual level is open)."""
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def plain_eager(*tensors) -> bool:
    """The call may skip the operators (``route`` is ``EAGER``)."""
    return route(*tensors) == EAGER
