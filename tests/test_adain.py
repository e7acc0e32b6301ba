"""Adaptive instance norm (per-sample affine) and AdaIN, against eager compositions."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from utils import TOL, randn, reference

import triton_instnorm as tin
from triton_instnorm import heuristics
from triton_instnorm.functional import apply_activation


def _eager_adaptive(x, scale, shift, eps=1e-5, activation=None, slope=0.01):
    shape = (-1, x.shape[1]) + (1,) * (x.dim() - 2)
    y = F.instance_norm(x, eps=eps) * scale.reshape(shape) + shift.reshape(shape)
    return apply_activation(y, activation, slope)


@pytest.mark.parametrize("param_shape", ["NC", "1C", "C"])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_adaptive_matches_eager_values_and_grads(param_shape, activation, poison, launches):
    x = randn(3, 4, 5, 6, seed=1)
    rows = {"NC": (3, 4), "1C": (1, 4), "C": (4,)}[param_shape]
    scale, shift = randn(*rows, seed=2) + 1, randn(*rows, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    y = tin.adaptive_instance_norm(*leaves, activation=activation, negative_slope=0.2)
    assert launches("_fwd") == 1
    y_ref = _eager_adaptive(*ref_leaves, activation=activation, slope=0.2)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.shape == a.shape
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])


def test_adaptive_float16_input_float32_params():
    x = randn(2, 3, 8, 8, dtype=torch.float32, seed=4).half()
    scale, shift = (randn(2, 3, dtype=torch.float32, seed=seed) for seed in (5, 6))
    y = tin.adaptive_instance_norm(x, scale, shift)
    assert y.dtype == torch.float16
    want = _eager_adaptive(x.double(), scale.double(), shift.double())
    torch.testing.assert_close(y.double(), want, **TOL[torch.float16])


def test_adaptive_bad_shapes():
    x = randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="scale must have shape"):
        tin.adaptive_instance_norm(x, randn(3, 3), randn(2, 3))
    with pytest.raises(ValueError, match="shift must have shape"):
        tin.adaptive_instance_norm(x, randn(2, 3), randn(2, 4))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        tin.adaptive_instance_norm(randn(2, 3, 1), randn(2, 3), randn(2, 3))


def test_adain_matches_definition_values_and_grads(poison, launches):
    content, style = randn(2, 3, 6, 5, seed=7), randn(2, 3, 4, 7, seed=8) * 3 + 1
    c1, s1 = content.clone().requires_grad_(), style.clone().requires_grad_()
    c2, s2 = content.clone().requires_grad_(), style.clone().requires_grad_()
    y = tin.adain(c1, s1)
    assert launches("_fwd") == 2  # style statistics pass + the normalize pass
    var, mean = torch.var_mean(s2, (2, 3), correction=0, keepdim=True)
    y_ref = reference(c2) * torch.sqrt(var + 1e-5) + mean
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(c1.grad, c2.grad, **TOL[torch.float64])
    torch.testing.assert_close(s1.grad, s2.grad, **TOL[torch.float64])


def test_adain_of_itself_is_identity():
    x = randn(2, 4, 9, 3, dtype=torch.float32, seed=9) * 2 + 3
    torch.testing.assert_close(tin.adain(x, x), x, atol=1e-5, rtol=1e-5)


def test_instance_stats_match_torch():
    x = randn(3, 2, 17, dtype=torch.float32, seed=10)
    mean, std = tin.instance_stats(x, eps=1e-3)
    var, m = torch.var_mean(x.double(), 2, correction=0)
    torch.testing.assert_close(mean.double(), m, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(std.double(), torch.sqrt(var + 1e-3), atol=1e-6, rtol=1e-6)


def test_modules():
    m = tin.AdaptiveInstanceNorm2d(3, activation="relu")
    x, scale, shift = randn(2, 3, 4, 4), randn(2, 3), randn(2, 3)
    torch.testing.assert_close(m(x, scale, shift),
                               _eager_adaptive(x, scale, shift, activation="relu"))
    torch.testing.assert_close(m(x[0], scale[0], shift[0]), m(x, scale, shift)[0])
    assert repr(m) == "AdaptiveInstanceNorm2d(3, eps=1e-05, activation='relu')"
    with pytest.raises(ValueError, match="num_features"):
        m(randn(2, 4, 4, 4), randn(2, 4), randn(2, 4))
    content, style = randn(2, 3, 5, 5), randn(2, 3, 6, 6)
    torch.testing.assert_close(tin.AdaIN()(content, style), tin.adain(content, style))
    with pytest.raises(ValueError, match="same N, C"):
        tin.adain(content, randn(2, 4, 6, 6))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "split"])
def test_style_statistics_backward_is_a_kernel(layout, poison, launches):
    """d(mean, std)/d style runs the _stats_bwd kernel (no eager arithmetic over the style
    tensor), in every layout and on split planes, and matches autograd through torch's ops."""
    style = randn(2, 3, 9, 7, seed=21) * 3 + 2
    if layout == "channels_last":
        style = style.contiguous(memory_format=torch.channels_last)
    style.requires_grad_()
    dmean, dstd = randn(2, 3, seed=22), randn(2, 3, seed=23)
    with contextlib.ExitStack() as stack:
        if layout == "split":  # tiles of 16, chunks of 16: 63-element planes in 4 chunks
            stack.enter_context(heuristics.tile_limit(16))
            stack.enter_context(heuristics.split_planes(16))
        mean, std = tin.instance_stats(style)
        torch.autograd.backward((mean, std), (dmean, dstd))
    assert launches("_stats_bwd") == 1
    assert launches("_fwd_split_stats") == (1 if layout == "split" else 0)
    ref = style.detach().clone().requires_grad_()
    var_r, mean_r = torch.var_mean(ref, (2, 3), correction=0)
    torch.autograd.backward((mean_r, torch.sqrt(var_r + 1e-5)), (dmean, dstd))
    torch.testing.assert_close(style.grad, ref.grad, **TOL[torch.float64])
