"""Who computes the instance norm that is timed, on which inputs, in which direction.

Providers (affine on; x, weight and bias require grad; eps 1e-5):

- ``triton_instnorm``: ``triton_instnorm.instance_norm(x, weight=w, bias=b)``, or with
  ``use_module`` the ``InstanceNorm{1,2,3}d(C, affine=True)`` module holding w and b; never its
  eager fallback (refused where the kernels are unavailable).
- ``triton_instnorm_clusters``: the same call with ``TRITON_INSTNORM_CLUSTERS=1``, which the
  package reads at each launch decision (every other provider runs with it unset). Unavailable,
  with the reason, where the package would not launch clusters (no cluster path, a Triton that
  cannot lower them, a GPU without clusters).
- ``torch_eager``: ``F.instance_norm``; ``torch_compile``: ``torch.compile`` of that call,
  static shapes, a fresh dynamo state per shape and dtype.
- ``copy``: ``y.copy_(x)`` on the same tensor, the measured memory roof.
- Peers, other Triton instance norms, when their packages import: ``flag_gems`` calls
  ``flag_gems.instance_norm(x, weight=, bias=, use_input_stats=True, eps=)`` (instance norm is one
  of FlagGems' fused ops, not an aten override, so ``flag_gems.use_gems()`` would not reach it);
  ``liger_groupnorm`` is Liger-Kernel's ``LigerGroupNorm(C, num_groups=C, eps=, bias=True)``
  holding w and b: group norm with one channel per group is instance norm. Liger makes
  channels_last inputs contiguous first; that copy is timed.

Each peer is run once per shape and dtype before it is timed: the output must come from its own
autograd Function (never a fall back to torch) and y, dx, dweight, dbias must match float64 eager
PyTorch within ``TOLERANCES``, or it is a failed measurement. A peer that cannot run here is
``Unavailable`` with the reason, which the report prints and writes into its summary.

On Triton's interpreter FlagGems 5.0.2 cannot run: its import picks a GPU vendor backend and
asks ``torch.cuda`` for the device name, and its ``libentry`` wrapper walks ``.fn`` down to a
compiled ``JITFunction``, which the interpreter replaces. Liger runs in float32 and float16 with
two adaptations around its forward launch that do what compiled Triton does, undone after it:
float arguments become fp32 scalars (its kernel calls ``eps.to(tl.float32)``) and the libdevice
``rsqrt`` its module imports by name becomes ``tl.math.rsqrt``. Its bfloat16 backward needs
``tl.atomic_add`` on bfloat16, which the interpreter lacks (float16 rounds partial sums to
bfloat16 and adds them into float16 buffers, which it can do).

Imports torch only: triton_instnorm and the peers are imported when a provider is built.
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

from perf import machine
from perf.model import DTYPES, EPS
from perf.schema import CLUSTERS, COMPILE, EAGER, FLAG_GEMS, LIGER, OURS
from perf.shapes import MEMORY_FORMAT_RANK

# triton_instnorm.device.CLUSTERS_ENV, which cannot be imported before the command decided on the
# interpreter (tests/test_perf_providers.py ties the two).
CLUSTERS_ENV = "TRITON_INSTNORM_CLUSTERS"
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
TORCH_MEMORY_FORMATS = {name: getattr(torch, "contiguous_format" if name == "contiguous" else name)
                        for name in MEMORY_FORMAT_RANK}
# Largest error relative to the largest magnitude of the float64 reference. Half dtypes: storage
# rounding (2^-8 for bfloat16) and Liger's bfloat16 atomics; wrong kernels miss by O(1).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


class Unavailable(Exception):
    """The provider cannot run here: package missing, no GPU, a dtype the interpreter lacks."""


class PeerMismatch(AssertionError):
    """The peer ran, but not through its kernels or not to eager PyTorch's values."""


@dataclass
class Case:
    """Inputs of one (shape, dtype), shared by all providers and directions."""
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    dy: torch.Tensor


def make_case(shape, dtype: str, memory_format: str, device: torch.device) -> Case:
    """Allocated and filled on the device (nnunet_3d tensors are 134M elements), untimed."""
    torch.manual_seed(0)
    opts = dict(device=device, dtype=TORCH_DTYPES[dtype])
    fmt = TORCH_MEMORY_FORMATS[memory_format]
    x = torch.randn(shape, **opts).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, **opts).contiguous(memory_format=fmt)
    weight = (1 + 0.1 * torch.randn(shape[1], **opts)).requires_grad_(True)
    bias = (0.1 * torch.randn(shape[1], **opts)).requires_grad_(True)
    return Case(x, weight, bias, dy)


def _eager(x, weight, bias):
    return F.instance_norm(x, weight=weight, bias=bias, use_input_stats=True, eps=EPS)


def _with_parameters(module, case: Case):
    """``module`` on the case's device and dtype, holding its weight and bias."""
    module = module.to(device=case.x.device, dtype=case.x.dtype)
    with torch.no_grad():
        module.weight.copy_(case.weight)
        module.bias.copy_(case.bias)
    return (lambda x, weight, bias: module(x)), (case.x, module.weight, module.bias)


def _ours(case: Case, use_module: bool):
    import triton_instnorm

    if not triton_instnorm.kernels_available(case.x):
        raise RuntimeError(f"triton_instnorm kernels unavailable for {case.x.device} tensors")
    if use_module:
        cls = getattr(triton_instnorm, f"InstanceNorm{case.x.dim() - 2}d")
        return _with_parameters(cls(case.x.shape[1], eps=EPS, affine=True), case)

    def norm(x, weight, bias):
        return triton_instnorm.instance_norm(x, weight=weight, bias=bias, use_input_stats=True,
                                             eps=EPS)

    return norm, (case.x, case.weight, case.bias)


def _compiled():
    # A fresh dynamo state per (shape, dtype): dozens of static shapes of one function would hit
    # the recompile limit and fall back to eager. "backward" replays one graph with
    # retain_graph=True, which AOTAutograd refuses for donated buffers (a memory optimization).
    from torch._functorch import config

    torch._dynamo.reset()
    if hasattr(config, "donated_buffer"):  # torch >= 2.6
        config.donated_buffer = False
    return torch.compile(_eager, dynamic=False)


def norm_fn(provider: str, case: Case, use_module: bool = False):
    """(callable(x, w, b) -> y, the tensors gradients are taken with respect to); sets
    TRITON_INSTNORM_CLUSTERS for the provider timed next."""
    os.environ.pop(CLUSTERS_ENV, None)
    if provider in (OURS, CLUSTERS):
        if provider == CLUSTERS:
            reason = clusters_reason(case.x)
            if reason:
                raise Unavailable(reason)
            os.environ[CLUSTERS_ENV] = "1"
        return _ours(case, use_module)
    if provider == EAGER:
        return _eager, (case.x, case.weight, case.bias)
    if provider == COMPILE:
        return _compiled(), (case.x, case.weight, case.bias)
    if provider in PEERS:
        return build_peer(provider, case)
    raise ValueError(f"unknown provider {provider!r}")


def direction_fn(fn, inputs, dy, direction: str):
    """What is timed. forward runs with autograd on, as in training (it saves the statistics,
    and torch.compile needs one forward graph for all directions); backward replays
    ``torch.autograd.grad`` on a graph built here, untimed (it returns the gradients, so no
    zeroing is timed); forward+backward does both."""
    if direction == "forward":
        return lambda: fn(*inputs)
    if direction == "backward":
        y = fn(*inputs)
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    if direction == "forward+backward":
        return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)
    raise ValueError(f"unknown direction {direction!r}")


def copy_fn(case: Case):
    src = case.x.detach()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def clusters_reason(x: torch.Tensor) -> str | None:
    """None when triton_instnorm launches thread-block clusters for ``x`` with the switch on."""
    try:
        from triton_instnorm import device
    except ImportError:
        return "this triton_instnorm has no cluster launches"
    os.environ[CLUSTERS_ENV] = "1"
    try:
        gpu = device.describe(x.device)
        if device.cluster_launch(gpu, real=x.is_cuda):
            return None
    finally:
        os.environ.pop(CLUSTERS_ENV, None)
    import triton
    return f"no cluster launches with triton {triton.__version__} on {gpu.name}"


# --------------------------------------------------------------------------- peers

@dataclass(frozen=True)
class Peer:
    name: str                # the provider name in the CSV
    module: str              # what must import
    install: str             # how to install it (said when it is missing)
    autograd_function: str   # module.qualname of the autograd Function whose kernels must run
    build: Callable          # (case, interpret) -> (callable(x, w, b) -> y, grad inputs)
    interpreter_reason: str | None = None  # why it cannot run on Triton's interpreter at all


def _build_flag_gems(case: Case, interpret: bool):
    import flag_gems

    def norm(x, weight, bias):
        return flag_gems.instance_norm(x, weight=weight, bias=bias, use_input_stats=True, eps=EPS)

    return norm, (case.x, case.weight, case.bias)


@contextlib.contextmanager
def _liger_on_interpreter():
    """The two adaptations of the module docstring, undone after each forward launch."""
    import numpy as np
    import triton.language as tl
    from liger_kernel.ops import group_norm
    from triton.runtime import interpreter

    saved = interpreter._implicit_cvt, group_norm.rsqrt

    def convert(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32),
                                                      tl.float32), tl.float32)
        return saved[0](arg)

    interpreter._implicit_cvt = convert
    group_norm.rsqrt = lambda value: tl.math.rsqrt(value)  # tl.math as patched at run time
    try:
        yield
    finally:
        interpreter._implicit_cvt, group_norm.rsqrt = saved


def _build_liger_groupnorm(case: Case, interpret: bool):
    if interpret and case.x.dtype == torch.bfloat16:
        raise Unavailable("Triton's interpreter has no bfloat16 atomics; Liger's backward "
                          "accumulates dweight/dbias with tl.atomic_add on bfloat16")
    from liger_kernel.transformers.group_norm import LigerGroupNorm

    c = case.x.shape[1]
    module = LigerGroupNorm(num_channels=c, num_groups=c, eps=EPS, bias=True)
    module_norm, inputs = _with_parameters(module, case)
    if not interpret:
        return module_norm, inputs

    def norm(x, weight, bias):
        with _liger_on_interpreter():
            return module_norm(x, weight, bias)

    return norm, inputs


PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    Peer(FLAG_GEMS, "flag_gems", "pip install --no-deps flag-gems==5.0.2 sqlalchemy PyYAML",
         "flag_gems.fused.instance_norm.InstanceNorm", _build_flag_gems,
         interpreter_reason="FlagGems 5.0.2 cannot run on Triton's interpreter: its import needs a "
                            "GPU vendor backend and torch.cuda, and its libentry wrapper needs "
                            "compiled JITFunction kernels (see perf/providers.py)"),
    Peer(LIGER, "liger_kernel.transformers.group_norm", "pip install liger-kernel",
         "liger_kernel.ops.group_norm.LigerGroupNormFunction", _build_liger_groupnorm),
)}


def _installed(module: str) -> bool:
    top = module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except ValueError:  # a module without a spec, e.g. a test's stand-in in sys.modules
        return top in sys.modules


def unavailable_reason(name: str, interpret: bool) -> str | None:
    """None when a peer or triton_instnorm_clusters can run here, else why not."""
    if name == CLUSTERS:
        return clusters_reason(torch.empty(0, device="cpu" if interpret else "cuda"))
    peer = PEERS[name]
    if not _installed(peer.module):
        return f"{peer.module.split('.')[0]} not installed ({peer.install})"
    if interpret and peer.interpreter_reason:
        return peer.interpreter_reason
    try:
        importlib.import_module(peer.module)
    except Exception as exc:  # FlagGems raises RuntimeError / AssertionError without a GPU
        lines = str(exc).strip().splitlines()
        return f"import {peer.module} failed: {type(exc).__name__}: {lines[0] if lines else ''}"
    return None


def status_line(reasons: dict[str, str | None]) -> str:
    """The one line the report prints at start."""
    return "peer providers: " + "; ".join(
        f"{name}: {'available' if reason is None else 'unavailable: ' + reason}"
        for name, reason in reasons.items())


def _reference(inputs, dy):
    # Contiguous float64 copies: torch 2.13's CPU F.instance_norm backward returns wrong
    # gradients for a batch of one in channels_last(_3d) with a channels_last gradient.
    leaves = [t.detach().double().contiguous().requires_grad_(True) for t in inputs]
    y = F.instance_norm(leaves[0], weight=leaves[1], bias=leaves[2], use_input_stats=True, eps=EPS)
    return (y, *torch.autograd.grad(y, leaves, dy.double().contiguous()))


def check_against_eager(name: str, norm, inputs, dy) -> dict[str, float]:
    """Run the peer once: its autograd Function must produce y, and y, dx, dweight, dbias must
    match float64 eager PyTorch within TOLERANCES. Returns the errors; raises PeerMismatch."""
    y = norm(*inputs)
    cls = getattr(y.grad_fn, "_forward_cls", None)
    function = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else repr(y.grad_fn)
    if function != PEERS[name].autograd_function:
        raise PeerMismatch(f"{name}: y came from {function}, not {PEERS[name].autograd_function}")
    got = (y, *torch.autograd.grad(y, inputs, dy))
    errors = {label: (g.double() - w).abs().max().item() / (w.abs().max().item() or 1.0)
              for label, g, w in zip(("y", "dx", "dweight", "dbias"), got, _reference(inputs, dy))}
    tolerance = TOLERANCES[inputs[0].dtype]
    bad = {label: err for label, err in errors.items() if not err <= tolerance}
    if bad:
        raise PeerMismatch(f"{name}: differs from eager PyTorch beyond {tolerance:g} (relative "
                           f"max error {', '.join(f'{k} {v:.2e}' for k, v in bad.items())})")
    return errors


def build_peer(name: str, case: Case, interpret: bool | None = None):
    """The peer's (callable, grad inputs), checked once; raises Unavailable or PeerMismatch."""
    interpret = machine.interpreting() if interpret is None else interpret
    reason = unavailable_reason(name, interpret)
    if reason is not None:
        raise Unavailable(reason)
    norm, inputs = PEERS[name].build(case, interpret)
    check_against_eager(name, norm, inputs, case.dy)
    return norm, inputs
