"""Fused activation epilogue: act(instance_norm(x)), values and gradients, as eager PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL, grad_tol, make_inputs, randn_like

import triton_instnorm as tin
from triton_instnorm import heuristics
from triton_instnorm.functional import apply_activation

ACTS = ["relu", "leaky_relu", "silu", "gelu"]


def _eager(x, w, b, activation, slope, **kw):
    return apply_activation(F.instance_norm(x, weight=w, bias=b, **kw), activation, slope)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("tile", [None, 8])
def test_values_and_grads(activation, dtype, tile, poison):
    ours = make_inputs((2, 3, 6, 5), dtype, requires_grad=True)
    ref = [t.detach().double().requires_grad_() for t in ours]
    dy = randn_like(ours[0], seed=1)
    with heuristics.tile_limit(tile or heuristics.MAX_SINGLE_TILE):
        y = tin.instance_norm(ours[0], weight=ours[1], bias=ours[2], activation=activation,
                              negative_slope=0.2)
        y.backward(dy)
    y_ref = _eager(ref[0], ref[1], ref[2], activation, 0.2)
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    for a, r, n in zip(ours, ref, (30, 60, 60)):
        torch.testing.assert_close(a.grad.double(), r.grad, **grad_tol(dtype, n))


@pytest.mark.parametrize("activation", ACTS)
def test_eval_mode_with_activation(activation):
    x = torch.randn(2, 3, 7, dtype=torch.float64, device=DEVICE)
    rm = torch.randn(3, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(3, dtype=torch.float64, device=DEVICE) + 0.5
    y = tin.instance_norm(x, rm, rv, use_input_stats=False, activation=activation)
    want = _eager(x, None, None, activation, 0.01, running_mean=rm, running_var=rv,
                  use_input_stats=False)
    torch.testing.assert_close(y, want, **TOL[torch.float64])


@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck(activation):
    x, w, b = make_inputs((2, 2, 5), torch.float64, seed=1, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: tin.instance_norm(x, weight=w, bias=b, activation=activation), (x, w, b))


def test_module_activation_matches_composition():
    m = tin.InstanceNorm3d(4, affine=True, activation="leaky_relu", negative_slope=0.01).to(DEVICE)
    ref = torch.nn.Sequential(torch.nn.InstanceNorm3d(4, affine=True), torch.nn.LeakyReLU(0.01))
    ref = ref.to(DEVICE)
    x = torch.randn(2, 4, 3, 4, 5, device=DEVICE)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
