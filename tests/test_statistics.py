"""Statistics that hold for any data: planes that defeat a shifted sum-of-squares, on every kernel
path, forward and backward; torch's rule for a zero variance with eps=0.

Each result is held to torch's own error against a float64 reference: at most ERROR_RATIO times
it, or ULPS units of the result's dtype at its largest element (the floor covers results where
torch, which accumulates float32 statistics in float64 on the CPU, is exact to the last bit).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL, assert_close, grads, randn

import triton_instnorm as tin
from triton_instnorm import heuristics

ERROR_RATIO = 4
ULPS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def _path(name):
    """(1, 4, 16, 16): planes of 256 elements: in one tile, looped in 8 tiles (channels_last: 32),
    split in 4 chunks, or split in chunks of one tile each (the split pass then takes a tile's
    statistics, ``ONE_TILE``, except for float64: heuristics.statistics_pass)."""
    stack = contextlib.ExitStack()
    if name in ("looped", "split"):
        stack.enter_context(heuristics.tile_limit(32))
        stack.enter_context(heuristics.split_planes(64 if name == "split" else 1 << 30))
    elif name == "split_one_tile":
        stack.enter_context(heuristics.tile_limit(128))
        stack.enter_context(heuristics.split_planes(32))
    return stack


def _adversarial(kind, shape, dtype):
    x = randn(*shape, seed=11)
    planes = x.view(shape[0], shape[1], -1)
    if kind == "outlier_first":  # x[plane, 0], the first value every path looks at
        planes[..., 0] = 1e4
    elif kind == "outlier_last":
        planes[..., -1] = 1e4
    elif kind == "halves_1e4_apart":
        planes[..., planes.shape[-1] // 2:] += 1e4
    return x.to(dtype)


def _reference_grads(x, w, b, dy):
    """(y, dx, dw, db) in float64 from the definition."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    x64, w64, b64 = leaves
    var, mean = torch.var_mean(x64, dim=(2, 3), correction=0, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + 1e-5) * w64.view(1, -1, 1, 1) + b64.view(1, -1, 1, 1)
    y.backward(dy.double())
    return [y.detach()] + [t.grad for t in leaves]


def _assert_near_torch(ours, torchs, refs, dtype):
    for name, got, theirs, ref in zip(("y", "dx", "dweight", "dbias"), ours, torchs, refs):
        error = (got.double() - ref).abs().max().item()
        torch_error = (theirs.double() - ref).abs().max().item()
        floor = ULPS * torch.finfo(dtype).eps * ref.abs().max().item()
        assert error <= max(ERROR_RATIO * torch_error, floor), (name, error, torch_error, floor)


# (1, 4, 10, 20): 200 elements, a partial tile after 6 whole ones when looped, a last chunk of 8
# elements, no whole tile, when split (its pivot then moves from the partial tile), and a last
# one-tile chunk that is not full (masked) when split in one-tile chunks
@pytest.mark.parametrize("shape", [(1, 4, 16, 16), (1, 4, 10, 20)], ids=["256", "200"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["single_tile", "looped", "split", "split_one_tile"])
@pytest.mark.parametrize("kind", ["outlier_first", "outlier_last", "halves_1e4_apart"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_adversarial_planes_match_torch(dtype, kind, path, layout, shape, launches):
    if shape[-1] == 20 and path == "single_tile":
        pytest.skip("the partial tiles of a stream, or of a split plane")
    g = torch.Generator().manual_seed(12)
    x = _adversarial(kind, shape, dtype).to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = (torch.rand(4, generator=g) + 0.5).to(dtype).to(DEVICE)
    b = torch.randn(4, generator=g).to(dtype).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    with _path(path):
        if path == "split_one_tile":
            plan = tin.explain(x).plans["forward"]
            hw = shape[2] * shape[3]
            assert plan.chunks > 1 and heuristics.cdiv(hw, plan.chunks) <= plan.config.BLOCK_HW
            one_tile = 0 if dtype == torch.float64 else plan.config.BLOCK_HW  # float64 streams
            options = plan.passes[0].options
            assert options["TILE_HW"] == one_tile
            # 256 elements: every chunk a full tile, loaded with no mask (channels_last: two
            # planes per lane); 200: the last chunk is not
            assert options.get("FULL", False) == (one_tile > 0 and hw == 256)
            assert options.get("LANE_PLANES", 0) == (2 if one_tile and layout == "channels_last"
                                                     else 0)
        ours = grads(tin.instance_norm, x, w, b, dy)
    assert launches("_fwd_split_stats") == (1 if path.startswith("split") else 0)
    _assert_near_torch(ours, grads(F.instance_norm, x, w, b, dy),
                       _reference_grads(x, w, b, dy), dtype)


def test_outlier_first_in_a_256x256_plane():
    """One 65536-element float32 plane with an outlier at index 0, launched as the heuristics
    choose (split across programs)."""
    x = _adversarial("outlier_first", (1, 1, 256, 256), torch.float32).to(DEVICE)
    w, b = torch.ones(1, device=DEVICE), torch.zeros(1, device=DEVICE)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    _assert_near_torch(grads(tin.instance_norm, x, w, b, dy), grads(F.instance_norm, x, w, b, dy),
                       _reference_grads(x, w, b, dy), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_statistics_pass_takes_chunks_of_its_own(dtype, launches):
    """Tiles of 32 elements (so that chunks of MIN_CHUNK_LEN hold many of them) and the chunk
    count of the heuristics: the statistics pass splits each plane into 32-element chunks of its
    own, while the normalize pass keeps the occupancy rule's, and the combine pass reads the
    statistics pass's partials. An outlier first, halves 1e4 apart."""
    x = _adversarial("halves_1e4_apart", (1, 2, 128, 128), dtype).to(DEVICE)
    x.view(1, 2, -1)[..., 0] = 1e4
    g = torch.Generator().manual_seed(15)
    w = (torch.rand(2, generator=g) + 0.5).to(dtype).to(DEVICE)
    b = torch.randn(2, generator=g).to(dtype).to(DEVICE)
    dy = torch.randn(x.shape, generator=g).to(dtype).to(DEVICE)
    with heuristics.tile_limit(32):
        plan = tin.explain(x).plans["forward"]
        stats, combine, normalize = plan.passes
        assert stats.grid == (2, 16384 // 32) and normalize.grid == (2, plan.chunks)
        assert plan.chunks == 2 and combine.options["chunks"] == 16384 // 32
        assert stats.options["TILE_HW"] == 32 and stats.options["FULL"]
        ours = grads(tin.instance_norm, x, w, b, dy)
    assert launches("_fwd_split_stats") == 1
    _assert_near_torch(ours, grads(F.instance_norm, x, w, b, dy),
                       _reference_grads(x, w, b, dy), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("path", ["single_tile", "looped", "split", "split_one_tile"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_eps0_constant_planes_take_torchs_rule(dtype, path, layout, poison):
    """var == 0 with eps == 0: torch's invstd = 0, so y is exactly the shift, dx exactly 0 and
    dweight gets nothing from the plane, where 1 / sqrt(0) would make all three NaN. The other
    planes of the batch and the running statistics are as torch has them."""
    shape = (2, 3, 16, 16)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(shape, generator=g).to(dtype)
    x[0, 0], x[1, 2] = 7.25, -3.0
    x = x.to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.tensor([1.5, -0.75, 2.0], dtype=dtype, device=DEVICE)
    b = torch.randn(3, generator=g).to(dtype).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    running = {name: (torch.zeros(3, dtype=acc, device=DEVICE), torch.ones(3, dtype=acc,
                                                                          device=DEVICE))
               for name in ("ours", "torch")}

    def run(fn, name):
        return grads(lambda x, weight, bias: fn(x, *running[name], weight, bias, eps=0.0),
                     x, w, b, dy)

    with _path(path):
        ours = run(tin.instance_norm, "ours")
    theirs = run(F.instance_norm, "torch")
    y, dx = ours[0], ours[1]
    for n, c in ((0, 0), (1, 2)):
        assert torch.equal(y[n, c], torch.full_like(y[n, c], b[c].item()))
        assert torch.equal(dx[n, c], torch.zeros_like(dx[n, c]))
    for got, want in zip(ours + list(running["ours"]), theirs + list(running["torch"])):
        assert torch.isfinite(got).all()
        assert_close(got, want, dtype, atol=4 * TOL[dtype]["atol"], rtol=4 * TOL[dtype]["rtol"])
