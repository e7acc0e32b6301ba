"""Gradients for input, weight and bias against eager PyTorch, float64, and gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from _reference import TOL, grad_tol, reference

import triton_instnorm as tin
from triton_instnorm import heuristics


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(fn, x, w, b, dy):
    x, w, b = _leaf(x), (_leaf(w) if w is not None else None), (_leaf(b) if b is not None else None)
    y = fn(x, w, b)
    y.backward(dy)
    return y, x.grad, (w.grad if w is not None else None), (b.grad if b is not None else None)


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 - 0.7).to(dtype).to(DEVICE)
    w = (torch.randn(shape[1], generator=g, dtype=torch.float64) + 1).to(dtype).to(DEVICE)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return x, w, b, dy


def _check_grads(shape, dtype, tile=None, seed=0):
    x, w, b, dy = _data(shape, dtype, seed)

    def ours(x, w, b):
        return tin.instance_norm(x, weight=w, bias=b)

    def ref64(x, w, b):
        return reference(x, w, b)

    if tile is None:
        _, dx, dw, db = _grads(ours, x, w, b, dy)
    else:
        with heuristics.tile_limit(tile):
            _, dx, dw, db = _grads(ours, x, w, b, dy)
    _, dx64, dw64, db64 = _grads(ref64, x.double(), w.double(), b.double(), dy.double())
    _, dxe, dwe, dbe = _grads(lambda x, w, b: F.instance_norm(x, weight=w, bias=b), x, w, b, dy)
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
    _, dx, dw, db = _grads(lambda x, w, b: tin.instance_norm(x, weight=w, bias=b), x, w, b, dy)
    _, dx64, dw64, db64 = _grads(lambda x, w, b: reference(x, w, b), x, w, b, dy)
    torch.testing.assert_close(dx, dx64, **TOL[torch.float64])
    if w is not None:
        torch.testing.assert_close(dw, dw64, **TOL[torch.float64])
    if b is not None:
        torch.testing.assert_close(db, db64, **TOL[torch.float64])


def test_only_weight_requires_grad():
    x, w, b, dy = _data((2, 3, 10), torch.float64, seed=4)
    w = _leaf(w)
    tin.instance_norm(x, weight=w, bias=b).backward(dy)
    w64 = _leaf(w)
    reference(x, w64, b).backward(dy)
    torch.testing.assert_close(w.grad, w64.grad, **TOL[torch.float64])


def test_eval_mode_grads(poison):
    x, w, b, dy = _data((3, 4, 7), torch.float64, seed=5)
    rm = torch.randn(4, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(4, dtype=torch.float64, device=DEVICE) + 0.5

    def ours(x, w, b):
        return tin.instance_norm(x, rm, rv, w, b, use_input_stats=False)

    def ref(x, w, b):
        return F.instance_norm(x, rm, rv, w, b, use_input_stats=False)

    for got, want in zip(_grads(ours, x, w, b, dy), _grads(ref, x, w, b, dy)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_gradcheck_float64(use_input_stats):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    rm = torch.randn(3, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(3, dtype=torch.float64, device=DEVICE) + 0.5

    def fn(x, w, b):
        return tin.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats=use_input_stats)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


def test_deterministic_bitwise():
    """Same inputs, same gradients, bit for bit (no atomics anywhere)."""
    x, w, b, dy = _data((8, 6, 50), torch.float32, seed=7)
    first = _grads(lambda x, w, b: tin.instance_norm(x, weight=w, bias=b), x, w, b, dy)
    for _ in range(2):
        again = _grads(lambda x, w, b: tin.instance_norm(x, weight=w, bias=b), x, w, b, dy)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def test_expanded_upstream_gradient():
    """y.sum().backward() hands the kernel a dy with all strides 0."""
    x, w, b, _ = _data((2, 3, 4, 5), torch.float64, seed=8)
    dy = torch.ones((), dtype=torch.float64, device=DEVICE).expand(x.shape)
    got = _grads(lambda x, w, b: tin.instance_norm(x, weight=w, bias=b), x, w, b, dy)
    want = _grads(lambda x, w, b: reference(x, w, b), x, w, b, dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL[torch.float64])
