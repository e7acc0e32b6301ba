"""Gradients for input, weight and bias against eager PyTorch, float64, and gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL, grad_tol, grads, leaf, make_inputs, randn_like, reference

import triton_instnorm as tin
from triton_instnorm import heuristics


def _data(shape, dtype, seed=0):
    """x, weight, bias and an upstream gradient dy."""
    x, w, b = make_inputs(shape, dtype, seed=seed)
    return x, w, b, randn_like(x, seed=seed + 100)


def _check_grads(shape, dtype, tile=None, seed=0):
    x, w, b, dy = _data(shape, dtype, seed)
    if tile is None:
        _, dx, dw, db = grads(tin.instance_norm, x, w, b, dy)
    else:
        with heuristics.tile_limit(tile):
            _, dx, dw, db = grads(tin.instance_norm, x, w, b, dy)
    _, dx64, dw64, db64 = grads(reference, x.double(), w.double(), b.double(), dy.double())
    _, dxe, dwe, dbe = grads(F.instance_norm, x, w, b, dy)
    hw = math.prod(shape[2:])
    # dx is a per-plane reduction too: its error grows with the plane length.
    tx = grad_tol(dtype, hw)
    tp = grad_tol(dtype, shape[0] * hw)
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    torch.testing.assert_close(dx.double(), dx64, **tx)
    torch.testing.assert_close(dw.double(), dw64, **tp)
    torch.testing.assert_close(db.double(), db64, **tp)
    # Against eager PyTorch: never less accurate than it (eager's own error in bfloat16 on
    # 2-element planes, where the exact dx is 0, is ~0.2).
    for ours_g, eager_g, g64, t in ((dx, dxe, dx64, tx), (dw, dwe, dw64, tp), (db, dbe, db64, tp)):
        ours_err = (ours_g.double() - g64).abs().max().item()
        eager_err = (eager_g.double() - g64).abs().max().item()
        assert ours_err <= max(eager_err, t["atol"]) * 1.01 + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (4, 2, 2), (3, 4, 3, 3, 3), (16, 8, 33)])
def test_grads_match(shape, dtype, poison, launches):
    _check_grads(shape, dtype)
    assert launches("_bwd") == 1 and launches("_sum_partials_over_n") == 1


@pytest.mark.parametrize("shape", [(2, 3, 100), (1, 2, 9, 7)])
def test_grads_multi_tile(shape, poison):
    """Planes longer than the backward tile: sums in one sweep, dx in a second."""
    _check_grads(shape, torch.float32, tile=16, seed=1)


def test_grads_huge_plane():
    _check_grads((2, 1, heuristics.MAX_SINGLE_TILE + 5), torch.float32, seed=2)


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)])
def test_partial_affine_grads(affine, poison):
    x, w, b, dy = _data((2, 3, 10), torch.float64, seed=3)
    w = w if affine[0] else None
    b = b if affine[1] else None
    _, dx, dw, db = grads(tin.instance_norm, x, w, b, dy)
    _, dx64, dw64, db64 = grads(reference, x, w, b, dy)
    torch.testing.assert_close(dx, dx64, **TOL[torch.float64])
    if w is not None:
        torch.testing.assert_close(dw, dw64, **TOL[torch.float64])
    if b is not None:
        torch.testing.assert_close(db, db64, **TOL[torch.float64])


def test_only_weight_requires_grad():
    x, w, b, dy = _data((2, 3, 10), torch.float64, seed=4)
    w = leaf(w)
    tin.instance_norm(x, weight=w, bias=b).backward(dy)
    w64 = leaf(w)
    reference(x, w64, b).backward(dy)
    torch.testing.assert_close(w.grad, w64.grad, **TOL[torch.float64])


def test_eval_mode_grads(poison):
    x, w, b, dy = _data((3, 4, 7), torch.float64, seed=5)
    rm = torch.randn(4, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(4, dtype=torch.float64, device=DEVICE) + 0.5

    def ours(x, weight, bias):
        return tin.instance_norm(x, rm, rv, weight, bias, use_input_stats=False)

    def ref(x, weight, bias):
        return F.instance_norm(x, rm, rv, weight, bias, use_input_stats=False)

    for got, want in zip(grads(ours, x, w, b, dy), grads(ref, x, w, b, dy)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_gradcheck_float64(use_input_stats):
    x, w, b = make_inputs((2, 3, 5), torch.float64, seed=6, requires_grad=True)
    rm = torch.randn(3, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(3, dtype=torch.float64, device=DEVICE) + 0.5

    def fn(x, w, b):
        return tin.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats=use_input_stats)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


def test_deterministic_bitwise():
    """Same inputs, same gradients, bit for bit (no atomics anywhere)."""
    x, w, b, dy = _data((8, 6, 50), torch.float32, seed=7)
    first = grads(tin.instance_norm, x, w, b, dy)
    for _ in range(2):
        again = grads(tin.instance_norm, x, w, b, dy)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def test_expanded_upstream_gradient():
    """y.sum().backward() hands the kernel a dy with all strides 0."""
    x, w, b, _ = _data((2, 3, 4, 5), torch.float64, seed=8)
    dy = torch.ones((), dtype=torch.float64, device=DEVICE).expand(x.shape)
    got = grads(tin.instance_norm, x, w, b, dy)
    want = grads(reference, x, w, b, dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL[torch.float64])
