"""Other Triton instance-norm kernels as benchmark providers: FlagGems and Liger-Kernel.

``flag_gems``
    FlagGems' ``flag_gems.instance_norm(x, weight=, bias=, use_input_stats=True, eps=)``, the
    entry point FlagGems' own tests and benchmarks call. ``flag_gems.use_gems()`` would not reach
    it: instance norm is one of FlagGems' "fused" ops, not an aten override, so under
    ``use_gems`` ``F.instance_norm`` stays torch's. Forward and backward are the kernels of its
    autograd Function ``flag_gems.fused.instance_norm.InstanceNorm``.
``liger_groupnorm``
    Liger-Kernel's ``LigerGroupNorm(C, num_groups=C, eps=, bias=True)``, the module its users
    build: group norm with one channel per group is instance norm with a per-channel affine.
    Its autograd Function is ``liger_kernel.ops.group_norm.LigerGroupNormFunction``.

A peer is used when its package imports; otherwise ``availability`` says why, and perf.report
prints that in one line and writes it into the summary. Before a peer is timed on a shape and
dtype, ``build`` runs it once and checks its output and gradients against float64 eager PyTorch
and that its own autograd Function produced them (never a silent fall back to torch).

On Triton's interpreter (CPU smoke runs):

* FlagGems cannot run. Importing ``flag_gems`` 5.0.2 picks a GPU vendor backend (it has none for
  the CPU: the import raises "No device were detected") and asks ``torch.cuda`` for the device
  name; its ``libentry`` kernel wrapper also walks ``.fn`` down to a compiled
  ``triton.runtime.JITFunction``, which ``TRITON_INTERPRET=1`` replaces by an
  ``InterpretedFunction`` (AttributeError at import). Its wiring is tested with a stand-in module.
* Liger runs in float32 and float16 with two interpreter-only adaptations around its forward
  launch, both doing what compiled Triton does: float arguments become fp32 scalars (Liger calls
  ``eps.to(tl.float32)``, the interpreter passes a Python float), and the libdevice ``rsqrt`` its
  module imports by name becomes ``tl.math.rsqrt`` (the interpreter maps ``tl.math`` only).
  bfloat16 is unavailable there: Liger's backward accumulates dweight/dbias of bfloat16 inputs
  with ``tl.atomic_add`` on bfloat16, and the interpreter's atomics have no bfloat16 (numpy has
  none). For float16 inputs Liger rounds the partial sums to bfloat16 and adds them into float16
  buffers, which the interpreter can do.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


class Unavailable(Exception):
    """The peer cannot run here: package missing, no GPU, or a dtype the interpreter lacks."""


class PeerMismatch(AssertionError):
    """The peer ran, but not through its kernels or not to eager PyTorch's values."""


@dataclass(frozen=True)
class Peer:
    name: str                # the provider name in the CSV
    module: str              # what must import
    install: str             # how to install it (said when it is missing)
    autograd_function: str   # module.qualname of the autograd Function whose kernels must run
    build: Callable          # (case, eps, interpret) -> (callable(x, w, b) -> y, grad inputs)
    interpreter_reason: str | None = None  # why it cannot run on Triton's interpreter at all


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (read by triton at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- FlagGems

def _build_flag_gems(case, eps: float, interpret: bool):
    import flag_gems

    def norm(x, weight, bias):
        return flag_gems.instance_norm(x, weight=weight, bias=bias, use_input_stats=True, eps=eps)

    return norm, (case.x, case.weight, case.bias)


# --------------------------------------------------------------------------- Liger-Kernel

_BF16_ON_INTERPRETER = ("Triton's interpreter has no bfloat16 atomics; Liger's backward "
                        "accumulates dweight/dbias with tl.atomic_add on bfloat16")


def _fp32_scalar(convert):
    """The interpreter's argument conversion, with floats passed as fp32 scalars (as compiled)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def convert_float_too(arg):
        if isinstance(arg, float):
            return tl.tensor(TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    return convert_float_too


@contextlib.contextmanager
def _liger_on_interpreter():
    """The two adaptations of the module docstring, undone after each forward launch."""
    import triton.language as tl
    from triton.runtime import interpreter
    from liger_kernel.ops import group_norm

    saved = interpreter._implicit_cvt, group_norm.rsqrt
    interpreter._implicit_cvt = _fp32_scalar(saved[0])
    # Looked up when the kernel runs, i.e. after the interpreter patched tl.math.
    group_norm.rsqrt = lambda value: tl.math.rsqrt(value)
    try:
        yield
    finally:
        interpreter._implicit_cvt, group_norm.rsqrt = saved


def _build_liger_groupnorm(case, eps: float, interpret: bool):
    if interpret and case.x.dtype == torch.bfloat16:
        raise Unavailable(_BF16_ON_INTERPRETER)
    from liger_kernel.transformers.group_norm import LigerGroupNorm

    channels = case.x.shape[1]
    module = LigerGroupNorm(num_channels=channels, num_groups=channels, eps=eps, bias=True)
    module = module.to(device=case.x.device, dtype=case.x.dtype)
    with torch.no_grad():
        module.weight.copy_(case.weight)
        module.bias.copy_(case.bias)
    launch_context = _liger_on_interpreter if interpret else contextlib.nullcontext

    def norm(x, weight, bias):  # weight and bias are the module's own parameters
        with launch_context():
            return module(x)

    return norm, (case.x, module.weight, module.bias)


PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    Peer("flag_gems", "flag_gems", "pip install --no-deps flag-gems==5.0.2 sqlalchemy PyYAML",
         "flag_gems.fused.instance_norm.InstanceNorm", _build_flag_gems,
         interpreter_reason="FlagGems 5.0.2 cannot run on Triton's interpreter: its import needs a "
                            "GPU vendor backend and torch.cuda, and its libentry wrapper needs "
                            "compiled JITFunction kernels (see perf/README.md)"),
    Peer("liger_groupnorm", "liger_kernel.transformers.group_norm", "pip install liger-kernel",
         "liger_kernel.ops.group_norm.LigerGroupNormFunction", _build_liger_groupnorm),
)}


# --------------------------------------------------------------------------- availability

def _installed(module: str) -> bool:
    top = module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except ValueError:  # a module without a spec, e.g. a test's stand-in in sys.modules
        return top in sys.modules


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].strip() if text else ''}".rstrip(": ")


def unavailable_reason(name: str, interpret: bool) -> str | None:
    """None when the peer can run here, else why not (package missing, import error, interpreter)."""
    peer = PEERS[name]
    if not _installed(peer.module):
        return f"{peer.module.split('.')[0]} not installed ({peer.install})"
    if interpret and peer.interpreter_reason:
        return peer.interpreter_reason
    try:
        importlib.import_module(peer.module)
    except Exception as exc:  # FlagGems raises RuntimeError / AssertionError without a GPU
        return f"import {peer.module} failed: {_first_line(exc)}"
    return None


def availability(interpret: bool) -> dict[str, str | None]:
    return {name: unavailable_reason(name, interpret) for name in PEERS}


def status_line(status: dict[str, str | None]) -> str:
    """The one line perf.report prints at start."""
    parts = [f"{name}: {'available' if reason is None else 'unavailable: ' + reason}"
             for name, reason in status.items()]
    return "peer providers: " + "; ".join(parts)


# --------------------------------------------------------------------------- checks

# Largest error allowed, relative to the largest magnitude of the float64 reference tensor.
# Half dtypes: storage rounding of x, y, dx (2^-8 relative for bfloat16) plus Liger's bfloat16
# atomics for dweight/dbias; wrong kernels miss by O(1).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def _function_name(y: torch.Tensor) -> str:
    cls = getattr(y.grad_fn, "_forward_cls", None)
    return f"{cls.__module__}.{cls.__qualname__}" if cls is not None else repr(y.grad_fn)


def _reference(inputs, dy, eps):
    # Contiguous float64 copies: torch 2.13's CPU F.instance_norm backward returns wrong
    # gradients for a batch of one in channels_last(_3d) with a channels_last gradient.
    leaves = [t.detach().double().contiguous().requires_grad_(True) for t in inputs]
    y = F.instance_norm(leaves[0], weight=leaves[1], bias=leaves[2], use_input_stats=True, eps=eps)
    return (y, *torch.autograd.grad(y, leaves, dy.double().contiguous()))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item() or 1.0
    return (got.double() - want).abs().max().item() / scale


def check_against_eager(name: str, norm, inputs, dy, eps: float) -> dict[str, float]:
    """Run the peer once: its autograd Function must produce y, and y, dx, dweight, dbias must
    match float64 eager PyTorch within TOLERANCES. Returns the errors; raises PeerMismatch."""
    y = norm(*inputs)
    function = _function_name(y)
    if function != PEERS[name].autograd_function:
        raise PeerMismatch(f"{name}: y came from {function}, not {PEERS[name].autograd_function}")
    got = (y, *torch.autograd.grad(y, inputs, dy))
    want = _reference(inputs, dy, eps)
    errors = {label: relative_error(g, w) for label, g, w in zip(("y", "dx", "dweight", "dbias"), got, want)}
    tolerance = TOLERANCES[inputs[0].dtype]
    bad = {label: err for label, err in errors.items() if not err <= tolerance}
    if bad:
        raise PeerMismatch(f"{name}: differs from eager PyTorch beyond {tolerance:g} "
                           f"(relative max error {', '.join(f'{k} {v:.2e}' for k, v in bad.items())})")
    return errors


def build(name: str, case, eps: float, interpret: bool | None = None):
    """(callable(x, w, b) -> y, the tensors gradients are taken with respect to), checked once.

    Raises Unavailable (cannot run here) or PeerMismatch (wrong function or values)."""
    interpret = interpreting() if interpret is None else interpret
    reason = unavailable_reason(name, interpret)
    if reason is not None:
        raise Unavailable(reason)
    norm, inputs = PEERS[name].build(case, eps, interpret)
    check_against_eager(name, norm, inputs, case.dy, eps)
    return norm, inputs
