"""Planes split across programs (few huge planes): values, gradients, statistics, determinism."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL, grad_tol, make_inputs, randn, randn_like, reference

import triton_instnorm as tin
from triton_instnorm import heuristics


@contextlib.contextmanager
def _split(tile=16, chunk=48):
    """Tiles of 16 elements, chunks of 48: a 100-element plane becomes 3 chunks."""
    with heuristics.tile_limit(tile), heuristics.split_planes(chunk):
        yield


def _data(shape, dtype=torch.float64, seed=0):
    """x, weight, bias and an upstream gradient dy."""
    x, w, b = make_inputs(shape, dtype, seed=seed)
    return x, w, b, randn_like(x, seed=seed + 100)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 100), (1, 2, 9, 13), (3, 1, 4, 5, 6)])
def test_split_values_and_grads(shape, dtype, poison, launches):
    x, w, b, dy = _data(shape, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with _split():
        y = tin.instance_norm(leaves[0], weight=leaves[1], bias=leaves[2], activation="silu")
        y.backward(dy)
    # one kernel per pass: the split adds a pass of partial sums and their combine before the
    # _fwd / _bwd that every unsplit plane takes
    for split_pass, combine, last in (("_fwd_split_stats", "_fwd_combine", "_fwd"),
                                      ("_bwd_split_sums", "_bwd_combine", "_bwd")):
        assert launches(split_pass) == launches(combine) == launches(last) == 1
    ref = [t.double().clone().requires_grad_() for t in (x, w, b)]
    y_ref = F.silu(reference(*ref))
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    hw = x[0, 0].numel()
    for got, want, n in zip(leaves, ref, (hw, hw * shape[0], hw * shape[0])):
        torch.testing.assert_close(got.grad.double(), want.grad, **grad_tol(dtype, n))


def test_split_matches_unsplit_closely_and_is_deterministic():
    x, w, b, dy = _data((2, 4, 200), torch.float32, seed=1)
    plain = tin.instance_norm(x, weight=w, bias=b)
    with _split():
        first = tin.instance_norm(x, weight=w, bias=b)
        again = tin.instance_norm(x, weight=w, bias=b)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, plain, **TOL[torch.float32])


def test_split_running_stats_and_eval(poison):
    x, w, b, _ = _data((3, 2, 90), torch.float64, seed=2)
    rm, rv = torch.zeros(2, dtype=torch.float64, device=DEVICE), torch.ones(2, dtype=torch.float64,
                                                                            device=DEVICE)
    rm_t, rv_t = rm.clone(), rv.clone()
    with _split():
        tin.instance_norm(x, rm, rv, w, b, momentum=0.3)
        y_eval = tin.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    F.instance_norm(x, rm_t, rv_t, w, b, momentum=0.3)
    torch.testing.assert_close(rm, rm_t, **TOL[torch.float64])
    torch.testing.assert_close(rv, rv_t, **TOL[torch.float64])
    torch.testing.assert_close(y_eval, F.instance_norm(x, rm_t, rv_t, w, b, use_input_stats=False),
                               **TOL[torch.float64])


def test_split_large_mean_and_huge_spread():
    g = torch.Generator().manual_seed(3)
    x = (1e4 + 1e-2 * torch.randn(2, 2, 150, generator=g)).to(DEVICE)
    with _split():
        y = tin.instance_norm(x)
    rel = ((y.double() - reference(x)).abs().max() / reference(x).abs().max()).item()
    assert rel < 1e-3
    # A spread of 1e20 in one chunk only: chunks with different scales must combine correctly.
    x2 = torch.randn(1, 2, 150, generator=g).to(DEVICE)
    x2[0, 0, 100:] *= 1e20
    with _split():
        y2 = tin.instance_norm(x2)
    assert torch.isfinite(y2).all()
    torch.testing.assert_close(y2.double(), reference(x2), atol=1e-4, rtol=1e-4)


def test_split_channels_last(poison):
    x, w, b, dy = _data((2, 5, 11, 9), torch.float64, seed=4)
    x = x.to(memory_format=torch.channels_last)
    xo = x.clone(memory_format=torch.preserve_format).requires_grad_()
    with _split(tile=64, chunk=32):
        y = tin.instance_norm(xo, weight=w, bias=b)
        y.backward(dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x64 = x.contiguous().requires_grad_()
    y_ref = reference(x64, w, b)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(xo.grad, x64.grad, **TOL[torch.float64])


def test_split_style_statistics_for_adain():
    content, style = randn(2, 3, 40, seed=5), randn(2, 3, 130, seed=6) * 2 + 1
    with _split():
        got = tin.adain(content, style)
    var, mean = torch.var_mean(style, 2, correction=0, keepdim=True)
    torch.testing.assert_close(got, reference(content) * torch.sqrt(var + 1e-5) + mean,
                               **TOL[torch.float64])


def test_heuristic_splits_only_underfilled_long_planes():
    cfg_loop = heuristics.plane_config(1 << 20, 4, rows_contiguous=False)
    assert not cfg_loop.SINGLE_TILE
    hw = 1 << 20
    chunks = heuristics.split_chunks(hw, 4, cfg_loop, sm_count=132)
    assert chunks > 1
    # The kernels' chunk length (_chunk_range): whole tiles, every element covered, no empty chunk.
    # ceil(hw / chunks) elements, rounded up to whole tiles
    tile = cfg_loop.BLOCK_HW
    per_chunk = (hw + chunks - 1) // chunks
    chunk_len = (per_chunk + tile - 1) // tile * tile
    assert chunks * chunk_len >= hw > (chunks - 1) * chunk_len
    assert heuristics.split_chunks(hw, 4096, cfg_loop, sm_count=132) == 1
    cfg_small = heuristics.plane_config(1024, 4, rows_contiguous=False)
    assert heuristics.split_chunks(1024, 1, cfg_small, sm_count=132) == 1


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_split_gradcheck(use_input_stats):
    # Small on purpose: the interpreter runs each split program in Python (~10 ms each).
    x, w, b = make_inputs((1, 2, 24), torch.float64, seed=7, requires_grad=True)
    rm = torch.randn(2, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5

    def fn(x, w, b):
        return tin.instance_norm(x, rm.clone(), rv.clone(), w, b, use_input_stats=use_input_stats,
                                 activation="gelu")

    with _split(tile=8, chunk=8):
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
