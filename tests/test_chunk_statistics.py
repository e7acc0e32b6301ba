"""Split planes whose chunks are one tile each take that tile's statistics in the split pass
(``_fwd_split_stats`` with ``ONE_TILE``: two reductions, no stream; float64 keeps the stream,
heuristics.statistics_pass): the adversarial planes of tests/test_statistics.py match torch as
on every other path, both layouts."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_statistics import DTYPES, _adversarial, _assert_near_torch, _reference_grads
from utils import DEVICE, grads

import triton_instnorm as tin
from triton_instnorm import heuristics


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", ["outlier_first", "outlier_last", "halves_1e4_apart"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_one_tile_chunks_match_torch(dtype, kind, layout, launches):
    shape = (1, 4, 16, 16)
    g = torch.Generator().manual_seed(12)
    x = _adversarial(kind, shape, dtype).to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = (torch.rand(4, generator=g) + 0.5).to(dtype).to(DEVICE)
    b = torch.randn(4, generator=g).to(dtype).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    with contextlib.ExitStack() as stack:  # tiles of 128 elements at most, chunks of one tile
        stack.enter_context(heuristics.tile_limit(128))
        stack.enter_context(heuristics.split_planes(32))
        plan = tin.explain(x).plans["forward"]
        assert plan.chunks > 1 and heuristics.cdiv(256, plan.chunks) <= plan.config.BLOCK_HW
        ours = grads(tin.instance_norm, x, w, b, dy)
    assert launches("_fwd_split_stats") == 1
    _assert_near_torch(ours, grads(F.instance_norm, x, w, b, dy),
                       _reference_grads(x, w, b, dy), dtype)
