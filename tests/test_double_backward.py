"""Double backward (create_graph=True): gradgradcheck, a WGAN-GP gradient penalty against torch's
layer, and the first-order values staying the Triton kernel's."""

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, grad_tol, leaf, make_inputs, randn, randn_like

import triton_instnorm as tin


@pytest.mark.parametrize("activation", [None, "leaky_relu", "silu", "gelu"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradgradcheck_training(affine, activation, launches):
    x, w, b = make_inputs((2, 2, 3, 3), torch.float64, requires_grad=True)
    inputs = (x, w, b) if affine else (x,)

    def f(x, w=None, b=None):
        return tin.instance_norm(x, weight=w, bias=b, activation=activation, negative_slope=0.2)

    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)
    assert launches("_fwd") > 0 and launches("_bwd") > 0


def test_gradgradcheck_eval_with_running_stats():
    x, w, b = make_inputs((2, 3, 4), torch.float64, requires_grad=True)
    rm, rv = randn(3, seed=3), randn(3, seed=4).abs() + 0.5

    def f(x, w, b):
        return tin.instance_norm(x, rm, rv, w, b, use_input_stats=False, activation="silu")

    assert torch.autograd.gradgradcheck(f, (x, w, b), fast_mode=True)


def test_gradgradcheck_adaptive_and_adain():
    x, scale, shift = (leaf(t) for t in (randn(2, 2, 3, 2), randn(2, 2, seed=1) + 1,
                                         randn(1, 2, seed=2)))
    assert torch.autograd.gradgradcheck(
        lambda x, s, t: tin.adaptive_instance_norm(x, s, t, activation="gelu"),
        (x, scale, shift), fast_mode=True)
    content, style = leaf(randn(2, 2, 3, 3, seed=5)), leaf(randn(2, 2, 2, 3, seed=6))
    assert torch.autograd.gradgradcheck(tin.adain, (content, style), fast_mode=True)


def _stats(s):
    var, mean = torch.var_mean(s, tuple(range(2, s.dim())), correction=0, keepdim=True)
    return mean, torch.sqrt(var + 1e-5)


# The affine parameters computed from the input itself: each second derivative follows the
# parameters back to the input once, as torch's does.
PARAMETERS_FROM_INPUT = {
    "weight and bias of x": (
        lambda x: tin.instance_norm(x, weight=x.mean((0, 2, 3)), bias=x.amax((0, 2, 3))),
        lambda x: F.instance_norm(x, weight=x.mean((0, 2, 3)), bias=x.amax((0, 2, 3)))),
    "adain with a style of the content": (
        lambda x: tin.adain(x, x.flip(-1) * 2 + 1),
        lambda x: F.instance_norm(x) * _stats(x.flip(-1) * 2 + 1)[1]
        + _stats(x.flip(-1) * 2 + 1)[0]),
}


@pytest.mark.parametrize("name", list(PARAMETERS_FROM_INPUT))
def test_second_derivatives_with_parameters_computed_from_the_input(name, launches):
    ours, theirs = PARAMETERS_FROM_INPUT[name]
    x, v = randn(2, 3, 3, 2, seed=7), randn(2, 3, 3, 2, seed=8)
    got = torch.autograd.functional.hvp(lambda x: ours(x).square().sum(), x, v)
    want = torch.autograd.functional.hvp(lambda x: theirs(x).square().sum(), x, v)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    assert launches("_bwd") > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_create_graph_keeps_kernel_values(dtype):
    # First-order gradients taken with create_graph=True are exactly those of the plain backward.
    x, w, b = make_inputs((2, 3, 5, 4), dtype, requires_grad=True)
    dy = randn_like(x, seed=3)
    y = tin.instance_norm(x, weight=w, bias=b, activation="leaky_relu")
    plain = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    graphed = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
    for p, g in zip(plain, graphed):
        assert g.requires_grad
        torch.testing.assert_close(g, p, atol=0, rtol=0)


def _critic(norm):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), norm(4, affine=True),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(4, 1, 3, padding=1)).to(DEVICE)


def _gradient_penalty(critic, real, fake):
    """WGAN-GP (Gulrajani et al. 2017): the critic's gradient norm on interpolates, trained on."""
    g = torch.Generator().manual_seed(1)
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=g).to(DEVICE)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(mixed).sum()
    grad, = torch.autograd.grad(out, mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def test_wgan_gp_penalty_matches_torch(launches):
    ours, ref = _critic(tin.InstanceNorm2d), _critic(torch.nn.InstanceNorm2d)
    real, fake = (randn(3, 3, 8, 8, dtype=torch.float32, seed=seed) for seed in (7, 8))
    gp, gp_ref = _gradient_penalty(ours, real, fake), _gradient_penalty(ref, real, fake)
    gp.backward()
    gp_ref.backward()
    assert launches("_bwd") > 0
    torch.testing.assert_close(gp, gp_ref, atol=1e-5, rtol=1e-5)
    tol = grad_tol(torch.float32, 3 * 16)
    assert ours[1].weight.grad.abs().min() > 0  # the penalty reaches the norm's affine
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


def _penalty_grads(norm, x, w, b):
    x, w, b = leaf(x), leaf(w), leaf(b)
    y = norm(x, weight=w, bias=b)
    proj = randn(*x.shape, dtype=torch.float32, seed=9)
    gx, gw = torch.autograd.grad((y.float() * proj).sum(), (x, w), create_graph=True)
    (gx.float().square().sum() + gw.float().square().sum()).backward()
    assert b.grad is None  # d/dx and d/dw of a linear functional of y do not involve b
    return gx, gw, x.grad, w.grad


def test_double_backward_mixed_precision():
    # bfloat16 input with float32 parameters: every gradient keeps its input's dtype and is close
    # to the float64 values.
    x, w, b = make_inputs((2, 3, 4, 4), torch.float64)
    x = x.bfloat16()
    ours = _penalty_grads(tin.instance_norm, x, w.float(), b.float())
    ref = _penalty_grads(F.instance_norm, x.double(), w, b)
    bf16, f32 = torch.bfloat16, torch.float32
    assert [t.dtype for t in ours] == [bf16, f32, bf16, f32]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, atol=0.1 * r.abs().max().item(), rtol=0.05)


def test_create_graph_values_survive_eager_overflow():
    # float16 dx that overflows to inf: the values stay the kernel's (inf), never inf - inf = NaN.
    x = (randn(1, 2, 4, 4, dtype=torch.float32) * 1e-2).half().requires_grad_(True)
    y = tin.instance_norm(x, eps=1e-10)
    dy = torch.full_like(y, 6e4)
    dy[..., 0, 0] = -6e4
    plain, = torch.autograd.grad(y, x, dy, retain_graph=True)
    graphed, = torch.autograd.grad(y, x, dy, create_graph=True)
    assert plain.isinf().any()
    torch.testing.assert_close(graphed, plain, atol=0, rtol=0)


def test_second_derivatives_at_large_scale():
    # float32 x ~ 1e20, whose raw variance overflows float32: the eager graph is rebuilt in the
    # kernel's units, so the second derivatives still match float64 (they were all 0 before).
    def penalty_grad(norm, x, w):
        x, w = leaf(x), leaf(w)
        y = norm(x, weight=w)
        proj = randn(*x.shape, dtype=x.dtype, seed=9)
        _, gw = torch.autograd.grad((y * proj).sum(), (x, w), create_graph=True)
        gw.square().sum().backward()
        return x.grad

    x, w, _ = make_inputs((2, 3, 4, 4), torch.float64)
    x = x * 1e20
    ours = penalty_grad(tin.instance_norm, x.float(), w.float())
    ref = penalty_grad(F.instance_norm, x, w)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eps0_constant_plane_second_order_is_torchs(dtype, launches):
    """eps=0 on a constant plane: torch's rule (invstd = 0) holds in the eager graph of the
    create_graph backward too, so second-order gradients are finite and torch's."""
    x0, w0, b0 = make_inputs((2, 3, 4, 4), dtype)
    dy = randn_like(x0, seed=3)
    x0[0, 1] = 2.5
    results = []
    for f in (F.instance_norm, tin.instance_norm):
        x, w, b = (leaf(t) for t in (x0.cpu() if f is F.instance_norm else x0, w0, b0))
        y = f(x, weight=w.to(x.device), bias=b.to(x.device), eps=0.0)
        gx, gw, _ = torch.autograd.grad(y, (x, w, b), dy.to(x.device), create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w)))
    assert launches("_fwd") == 1 and launches("_bwd") == 1
    for ours, theirs in zip(results[1], results[0]):
        assert torch.isfinite(ours).all()
        tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(ours.cpu(), theirs, **tol)
