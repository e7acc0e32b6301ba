"""Forward values against eager PyTorch and a float64 reference, across dtypes, shapes, paths."""

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, assert_close, make_inputs, reference

import triton_instnorm as tin
from triton_instnorm import heuristics

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Odd shapes: primes, 2-element planes, sizes just over a power of two, many tiny planes,
# 1d / 2d / 3d spatial layouts.
SHAPES = [
    (2, 3, 5, 7),
    (3, 5, 2),
    (1, 1, 257),
    (2, 4, 3, 3, 3),
    (4, 33, 17),
    (64, 16, 2, 2),
    (1, 2, 129, 3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_eager_and_float64(shape, dtype, poison, launches):
    x, w, b = make_inputs(shape, dtype)
    y = tin.instance_norm(x, weight=w, bias=b)
    assert launches("_fwd") == 1
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, reference(x, w, b), dtype)
    assert_close(y, F.instance_norm(x, weight=w, bias=b), dtype)


@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_partial_affine(affine, poison):
    x, w, b = make_inputs((2, 3, 11), torch.float32)
    w = w if affine == "weight" else None
    b = b if affine == "bias" else None
    assert_close(tin.instance_norm(x, weight=w, bias=b), reference(x, w, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 100), (1, 2, 37, 5), (5, 3, 64)])
def test_multi_tile_loop(shape, dtype, poison, launches):
    """Planes longer than the tile take the streaming loop (tile capped to 16 elements here)."""
    x, w, b = make_inputs(shape, dtype, seed=1)
    with heuristics.tile_limit(16):
        y = tin.instance_norm(x, weight=w, bias=b)
    assert launches("_fwd") == 1
    assert_close(y, reference(x, w, b), dtype)


def test_one_huge_plane(poison):
    """One plane longer than any tile of the default heuristic (> MAX_SINGLE_TILE)."""
    x, w, b = make_inputs((1, 1, heuristics.MAX_SINGLE_TILE * 2 + 3), torch.float32, seed=2)
    assert_close(tin.instance_norm(x, weight=w, bias=b), reference(x, w, b), torch.float32)


def test_many_tiny_planes(poison):
    x, w, b = make_inputs((300, 7, 3), torch.float32, seed=3)
    assert_close(tin.instance_norm(x, weight=w, bias=b), reference(x, w, b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_eval_with_running_stats(dtype, poison, launches):
    x, w, b = make_inputs((3, 4, 6, 5), dtype, seed=4)
    rm = torch.randn(4, dtype=dtype, device=DEVICE)
    rv = torch.rand(4, dtype=dtype, device=DEVICE) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = tin.instance_norm(x, rm, rv, w, b, use_input_stats=False, momentum=0.3)
    assert launches("_fwd") == 1 and launches("_update_running_stats") == 0
    want = reference(x, w, b, running_mean=rm, running_var=rv, use_input_stats=False)
    assert_close(y, want, dtype)
    assert_close(y, F.instance_norm(x, rm, rv, w, b, use_input_stats=False), dtype)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_eval_single_spatial_element(poison):
    """One spatial element is refused when training, allowed with given statistics."""
    x, w, b = make_inputs((4, 3, 1, 1), torch.float32, seed=5)
    rm, rv = torch.zeros(3, device=DEVICE), torch.full((3,), 2.0, device=DEVICE)
    y = tin.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    assert_close(y, F.instance_norm(x, rm, rv, w, b, use_input_stats=False), torch.float32)
    x2 = torch.randn(5, 3, device=DEVICE)  # (N, C): no spatial dims at all
    assert_close(tin.instance_norm(x2, rm, rv, use_input_stats=False),
                 F.instance_norm(x2, rm, rv, use_input_stats=False), torch.float32)


def test_half_input_float32_params(poison):
    x, _, _ = make_inputs((2, 3, 40), torch.float16, seed=6)
    w = torch.randn(3, device=DEVICE)
    b = torch.randn(3, device=DEVICE)
    y = tin.instance_norm(x, weight=w, bias=b)
    assert y.dtype == torch.float16
    assert_close(y, F.instance_norm(x, weight=w, bias=b), torch.float16)


def test_eps_is_not_baked_into_the_kernel():
    """eps is a runtime argument: different values give different (correct) results."""
    x, _, _ = make_inputs((2, 3, 9), torch.float64, seed=7)
    x = x * 1e-2
    for eps in (1e-5, 1e-3, 0.5):
        assert_close(tin.instance_norm(x, eps=eps), reference(x, eps=eps), torch.float64)


def test_batch_independence():
    x, w, b = make_inputs((8, 3, 13, 4), torch.float32, seed=8)
    full = tin.instance_norm(x, weight=w, bias=b)
    for i in (0, 5):
        one = tin.instance_norm(x[i:i + 1], weight=w, bias=b)
        assert torch.equal(one[0], full[i])
