"""Float64 reference and per-dtype tolerances shared by the tests."""

import math

import torch

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
    """Instance norm in float64, straight from the definition."""
    x64 = x.double()
    dims = tuple(range(2, x.dim()))
    if use_input_stats:
        mean = x64.mean(dims, keepdim=True)
        var = x64.var(dims, unbiased=False, keepdim=True)
    else:
        shape = (1, -1) + (1,) * len(dims)
        mean = running_mean.double().view(shape)
        var = running_var.double().view(shape)
    y = (x64 - mean) / torch.sqrt(var + eps)
    shape = (1, -1) + (1,) * len(dims)
    if weight is not None:
        y = y * (weight.double().view(shape) if weight.dim() == 1 else weight.double().view(
            weight.shape + (1,) * len(dims)))
    if bias is not None:
        y = y + (bias.double().view(shape) if bias.dim() == 1 else bias.double().view(
            bias.shape + (1,) * len(dims)))
    from triton_instnorm.functional import apply_activation
    return apply_activation(y, activation, negative_slope)


def assert_close(actual, expected, dtype, **kw):
    tol = dict(TOL[dtype])
    tol.update(kw)
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **tol)
