"""Shared by the tests: the device, a float64 reference, per-dtype tolerances and random inputs.

DEVICE is CUDA when present, else the CPU through Triton's interpreter. TRITON_INTERPRET must be
set before triton is imported: conftest.py imports this module before anything imports triton.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton_instnorm.functional import apply_activation  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances against the float64 reference, per input dtype: about 4 ulps of the output dtype for
# values of magnitude ~3 (normalized outputs times an affine scale), float32 statistics.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def grad_tol(dtype, reduced: int):
    """Tolerance for a gradient summed over ``reduced`` elements (dweight, dbias): the error of a
    sum grows like sqrt(length) for random-sign terms."""
    t = TOL[dtype]
    scale = math.sqrt(max(reduced, 1))
    return dict(atol=t["atol"] * scale, rtol=t["rtol"] * scale)


def reference(x, weight=None, bias=None, eps=1e-5, running_mean=None, running_var=None,
              use_input_stats=True, activation=None, negative_slope=0.01):
    """Instance norm in float64, straight from the definition. weight and bias: (C,) or, per
    sample, (N, C)."""
    x64 = x.double()
    dims = tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * len(dims)
    if use_input_stats:
        mean = x64.mean(dims, keepdim=True)
        var = x64.var(dims, unbiased=False, keepdim=True)
    else:
        mean = running_mean.double().view(shape)
        var = running_var.double().view(shape)
    y = (x64 - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _per_channel(weight, shape)
    if bias is not None:
        y = y + _per_channel(bias, shape)
    return apply_activation(y, activation, negative_slope)


def _per_channel(p, shape):
    """A (C,) or (N, C) parameter in float64, broadcastable over x's spatial dims."""
    return p.double().view(shape if p.dim() == 1 else p.shape + shape[2:])


def assert_close(actual, expected, dtype, **kw):
    """``actual`` against ``expected`` in float64 within TOL[dtype] (``kw`` overrides it)."""
    tol = dict(TOL[dtype])
    tol.update(kw)
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **tol)


def randn(*shape, dtype=torch.float64, seed=0, device=DEVICE):
    """Standard normal values of ``shape`` from ``seed``: drawn in float64 on the CPU (the same
    values on every device), then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def randn_like(t, *, seed):
    """Standard normal values shaped, typed, laid out and placed like ``t`` (an upstream gradient
    dy). Take a seed other than t's: the same draws would make dy an affine function of x, for
    which dx is exactly 0."""
    values = randn(*t.shape, dtype=t.dtype, seed=seed, device=t.device)
    return torch.empty_like(t, memory_format=torch.preserve_format).copy_(values)


def make_inputs(shape, dtype=torch.float32, *, affine=True, seed=0,
                memory_format=torch.contiguous_format, requires_grad=False, device=DEVICE):
    """(x, weight, bias) for an instance norm, drawn from ``seed`` in float64, cast to ``dtype``.

    x: ``shape`` = (N, C, *spatial), 2 * randn + 0.5 (a mean and spread to take out), in
    ``memory_format``; weight: (C,), randn + 1; bias: (C,), randn; both None unless ``affine``.
    With ``requires_grad`` all three are leaves requiring grad.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(*size):
        return torch.randn(size, generator=g, dtype=torch.float64)

    x = (draw(*shape) * 2 + 0.5).to(dtype).to(device).contiguous(memory_format=memory_format)
    weight = (draw(shape[1]) + 1).to(dtype).to(device) if affine else None
    bias = draw(shape[1]).to(dtype).to(device) if affine else None
    if requires_grad:
        x, weight, bias = (leaf(t) for t in (x, weight, bias))
    return x, weight, bias


def leaf(t):
    """A detached copy of ``t`` (its layout kept) that requires grad; None stays None."""
    return None if t is None else t.detach().clone().requires_grad_()


def grads(fn, x, weight, bias, dy):
    """(y, dx, dweight, dbias) of ``fn(x, weight=weight, bias=bias)`` on leaf copies, dy
    backpropagated; the gradient of a parameter given as None is None."""
    x, weight, bias = leaf(x), leaf(weight), leaf(bias)
    y = fn(x, weight=weight, bias=bias)
    y.backward(dy)
    return [y.detach()] + [None if t is None else t.grad for t in (x, weight, bias)]
