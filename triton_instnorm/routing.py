"""``enable()`` / ``disable()`` / ``enabled()``: route ``torch.nn.functional.instance_norm`` to
the Triton kernels, without converting any model.

What is patched: the one attribute ``torch.nn.functional.instance_norm``. torch's
``InstanceNorm1d/2d/3d`` modules look it up at every call, and so does any code that calls
``F.instance_norm(...)`` through the module; a reference taken before ``enable()``
(``from torch.nn.functional import instance_norm``) and the ATen op ``torch.instance_norm``
keep PyTorch's computation.

The installed function has torch's signature and semantics: tensor subclasses and
``__torch_function__`` modes are handed the call first, as torch's own function does (and see it
as ``torch.nn.functional.instance_norm``); an input the kernels handle
(``kernels_available(input)``) goes to ``triton_instnorm.instance_norm``, which raises
PyTorch's errors and updates running statistics as PyTorch does; any other input (other devices,
CPU without the interpreter) goes to the function that was there before ``enable()``.

Nesting is counted: each ``enable()`` needs one ``disable()``, and the function that was there
before the first ``enable()`` comes back at the last ``disable()``, as the same object.
``enabled()`` pairs them around a ``with`` block (exceptions included). ``disable()`` without a
matching ``enable()`` raises RuntimeError.
"""

import contextlib
import functools
import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import dispatch, functional

__all__ = ["enable", "disable", "enabled", "is_enabled"]

_lock = threading.Lock()
_depth = 0
_replaced = None  # while enabled: the function enable() replaced ...
_installed = None  # ... and the one it installed


def _routed_instance_norm(previous):
    @functools.wraps(previous, assigned=("__name__", "__qualname__", "__doc__"))
    def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None,
                      running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None, use_input_stats: bool = True,
                      momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles this branch alone: a scripted model computes what the
            # function enable() replaced computes, as it does without enable().
            return previous(input, running_mean, running_var, weight, bias, use_input_stats,
                            momentum, eps)
        else:
            if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
                return handle_torch_function(
                    instance_norm, (input, running_mean, running_var, weight, bias), input,
                    running_mean=running_mean, running_var=running_var, weight=weight,
                    bias=bias, use_input_stats=use_input_stats, momentum=momentum, eps=eps)
            if not isinstance(input, Tensor) or not dispatch.kernels_available(input):
                return previous(input, running_mean, running_var, weight, bias,
                                use_input_stats, momentum, eps)
            return functional.instance_norm(input, running_mean=running_mean,
                                            running_var=running_var, weight=weight, bias=bias,
                                            use_input_stats=use_input_stats,
                                            momentum=momentum, eps=eps)

    # Named and documented as the function it replaces, but not marked as wrapping it: TorchScript
    # would compile that function's source against this module's globals.
    del instance_norm.__wrapped__
    return instance_norm


def enable() -> None:
    """Route ``torch.nn.functional.instance_norm`` to the Triton kernels (see the module
    docstring); nests with a count."""
    global _depth, _replaced, _installed
    with _lock:
        if _depth == 0:
            _replaced = F.instance_norm
            F.instance_norm = _installed = _routed_instance_norm(_replaced)
        _depth += 1


def disable() -> None:
    """Undo one ``enable()``; the last one puts back the function the first one replaced."""
    global _depth, _replaced, _installed
    with _lock:
        if _depth == 0:
            raise RuntimeError("triton_instnorm.disable() called without a matching enable()")
        _depth -= 1
        if _depth == 0:
            if F.instance_norm is not _installed:
                warnings.warn("torch.nn.functional.instance_norm was replaced by someone else "
                              "after triton_instnorm.enable(); disable() puts back the function "
                              "that enable() replaced", RuntimeWarning, stacklevel=2)
            F.instance_norm, _replaced, _installed = _replaced, None, None


def is_enabled() -> bool:
    """True between an ``enable()`` and its matching ``disable()``."""
    return _depth > 0


@contextlib.contextmanager
def enabled():
    """``with triton_instnorm.enabled(): ...`` routes instance norm to the kernels inside the
    block and restores what was there before on the way out, exceptions included."""
    enable()
    try:
        yield
    finally:
        disable()
