"""Bytes a residual block's end moves, ``act(norm(x) + skip)``, fused and not (perf/counting.py
counts the kernels' loads and stores through the interpreter; an eager elementwise op reads each
input and writes its output once).

Counted in tensor passes (one read or write of an activation-sized tensor): the fused forward reads
x and the residual and writes y, 3 passes where norm (2), add (3) and activation (2) take 7; the
backward reads x, dy and the residual (to recompute the activation's input) and writes dx and
the residual's gradient, 5 passes where the activation's backward (3) and the norm's (3) take 6
(the add's backward hands the gradient on). Without an activation the residual's gradient is
dy itself.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from utils import make_inputs, randn_like

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_instnorm as tin  # noqa: E402
from perf import counting, machine  # noqa: E402
from triton_instnorm import heuristics  # noqa: E402

pytestmark = [pytest.mark.perf,
              pytest.mark.skipif(not machine.interpreting(),
                                 reason="traffic is counted through Triton's interpreter only")]

SHAPE = (2, 4, 16, 16)
PIVOT = 1  # elements of x the forward loads per plane besides the sweeps (the shift's pivot)
STATS_BUDGET = 64  # bytes per plane the statistics and parameters may move


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("looped", [False, True])
def test_fused_residual_block_end(looped):
    x, w, b = make_inputs(SHAPE, torch.float32, requires_grad=True, device="cpu")
    skip = randn_like(x, seed=2).requires_grad_()
    dy = randn_like(x, seed=1)
    planes, tensor = SHAPE[0] * SHAPE[1], _nbytes(x)
    sweeps = 2 if looped else 1  # x (and dy) read by a statistics sweep and a normalize sweep
    with heuristics.tile_limit(32 if looped else heuristics.MAX_SINGLE_TILE):
        with counting.count() as fwd:
            y = tin.instance_norm(x, weight=w, bias=b, activation="leaky_relu", residual=skip)
        with counting.count() as bwd:
            dx, _, _, dskip = torch.autograd.grad(y, (x, w, b, skip), dy)
    assert [launch.kernel for launch in fwd.launches] == ["_fwd"]
    assert fwd.loaded(skip) == tensor  # read once, in the normalize sweep
    assert fwd.loaded(x) == sweeps * tensor + PIVOT * planes * x.element_size()
    assert fwd.stored(y) == tensor and fwd.stored(skip) == fwd.stored(x) == 0
    assert fwd.moved() <= (sweeps + 2) * tensor + STATS_BUDGET * planes
    assert bwd.stored(dx) == bwd.stored(dskip) == tensor
    assert bwd.loaded(x) == bwd.loaded(dy) == bwd.loaded(skip) == sweeps * tensor
    assert bwd.moved() <= (3 * sweeps + 2) * tensor + STATS_BUDGET * planes
    if not looped:  # the saving, in passes
        eager = {"norm": 2, "add": 3, "activation": 2}
        assert sum(eager.values()) == 7 and round(fwd.moved() / tensor) == 3
        assert round(bwd.moved() / tensor) == 5 and 3 + 3 == 6  # activation's and norm's backward


def test_without_activation_the_residual_gradient_is_dy():
    x, w, b = make_inputs(SHAPE, torch.float32, device="cpu")  # (only the residual wants one)
    skip = randn_like(x, seed=2).requires_grad_()
    dy = randn_like(x, seed=1)
    y = tin.instance_norm(x, weight=w, bias=b, residual=skip)
    with counting.count() as bwd:
        dskip, = torch.autograd.grad(y, (skip,), dy)
    assert dskip is dy and bwd.launches == []  # no kernel: the sum's gradient passes through
    torch.testing.assert_close(y, F.instance_norm(x, weight=w, bias=b) + skip)
