"""Planes held in a cluster of CTAs (``TRITON_INSTNORM_CLUSTERS=1``).

On the CPU the launches are planned for an emulated H100 and the interpreter runs each program
as one block, ignoring ``num_ctas``: these tests then prove the launch decisions (which planes
take a cluster, with how many CTAs, and that the launch passes ``num_ctas``) and the kernels' tile
math at the cluster tile sizes: values and gradients against float64 and eager PyTorch, each
cluster dtype (float64 takes none), at the threshold sizes and one past them. On an sm_90+ GPU the
same tests run the cluster kernels themselves. That the tiles compile to cluster reductions is
checked by tests/test_aot_devices.py.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL, grad_tol, grads, make_inputs, randn, randn_like, reference

import triton_instnorm as tin
from triton_instnorm import device, heuristics, launch

# Planned for the emulated H100 (CPU tensors): whether the installed Triton lowers clusters.
LOWERS = device.clusters_supported(device.EMULATED["h100"], real=False)
# Run on DEVICE: whether its GPU (the emulated H100 on the CPU) takes cluster launches.
needs_lowering = pytest.mark.skipif(
    not device.clusters_supported(device.describe(torch.device(DEVICE)),
                                  real=DEVICE != "cpu"),
    reason=f"no cluster launches on {DEVICE} with Triton {device.triton.__version__} (cross-CTA "
    "reductions need Triton >= 3.8 and sm_90+)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # float64 stays off clusters
ONE_CTA = heuristics.MAX_SINGLE_TILE
LARGEST = heuristics.MAX_SINGLE_TILE * heuristics.MAX_CLUSTER_CTAS  # 65,536


@pytest.fixture
def clusters(monkeypatch):
    monkeypatch.setenv(device.EMULATE_ENV, "h100")
    monkeypatch.setenv(device.CLUSTERS_ENV, "1")


@pytest.fixture
def recorded(monkeypatch):
    """The (kernel, grid, num_ctas, BLOCK_HW) of every launch, as launch.run makes it."""
    calls = []
    run = launch.run

    def recording(kernel, grid, **arguments):
        calls.append((kernel.fn.__name__, tuple(grid), arguments.get("num_ctas", 1),
                      arguments.get("BLOCK_HW")))
        run(kernel, grid, **arguments)

    monkeypatch.setattr(launch, "run", recording)
    return calls


def _ctas(shape, memory_format=torch.contiguous_format, dtype=torch.bfloat16):
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format)
    return tin.explain(x).plans["forward"].config.num_ctas


def _check(shape, dtype, memory_format=torch.contiguous_format, activation=None):
    """y, dx, dweight, dbias against float64; the gradients never less accurate than eager
    PyTorch's (y: both within a rounding of the output dtype)."""
    x, w, b = make_inputs(shape, dtype, memory_format=memory_format)
    dy = randn_like(x, seed=1)
    ours = grads(functools.partial(tin.instance_norm, activation=activation), x, w, b, dy)
    exact = grads(functools.partial(reference, activation=activation),
                  x.double(), w.double(), b.double(), dy.double())
    eager = None if activation else grads(F.instance_norm, x, w, b, dy)
    hw = math.prod(shape[2:])
    tols = [TOL[dtype], grad_tol(dtype, hw), grad_tol(dtype, shape[0] * hw),
            grad_tol(dtype, shape[0] * hw)]
    assert ours[0].is_contiguous(memory_format=memory_format)
    assert ours[1].is_contiguous(memory_format=memory_format)
    for i, (got, want, tol) in enumerate(zip(ours, exact, tols)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
        if eager is not None and i > 0:
            err = (got.double() - want).abs().max().item()
            eager_err = (eager[i].double() - want).abs().max().item()
            assert err <= max(eager_err, tol["atol"]) * 1.01 + 1e-12, (i, err, eager_err)


# ------------------------------------------------------------------------------- the decisions

# plane length -> CTAs per program with clusters on (0: the plane is streamed as without them)
LADDER = {ONE_CTA: 1, ONE_CTA + 1: 2, 2 * ONE_CTA: 2, 2 * ONE_CTA + 1: 4, 4 * ONE_CTA: 4,
          4 * ONE_CTA + 1: 8, LARGEST: 8, LARGEST + 1: 1}


@pytest.mark.skipif(not LOWERS, reason="no cluster launches with this Triton")
@pytest.mark.parametrize("hw", LADDER, ids=str)
def test_cluster_ladder(clusters, hw):
    x = torch.empty((2, 3, hw), dtype=torch.bfloat16)
    config = tin.explain(x).plans["forward"].config
    assert config.num_ctas == LADDER[hw]
    assert config.SINGLE_TILE == (hw <= LARGEST)
    if config.num_ctas > 1:  # each CTA holds one single-CTA tile with its warps
        assert config.BLOCK_HW == config.num_ctas * ONE_CTA and config.BLOCK_R == 1
        assert config.num_warps == heuristics.plane_config(ONE_CTA, 1, rows_contiguous=False,
                                                           itemsize=2).num_warps


@pytest.mark.skipif(not LOWERS, reason="no cluster launches with this Triton")
def test_float64_stays_off_clusters(clusters):
    """float64 planes longer than one tile are streamed: its cluster tile would spill."""
    assert _ctas((2, 3, 2 * ONE_CTA), dtype=torch.float64) == 1
    assert _ctas((2, 3, 2 * ONE_CTA), dtype=torch.float32) == 2


@pytest.mark.parametrize("emulate, on", [("h100", True), ("h200", True), ("b200", True),
                                         ("a100", False), ("mi300x", False)])
def test_clusters_need_hopper_or_newer(monkeypatch, emulate, on):
    monkeypatch.setenv(device.EMULATE_ENV, emulate)
    monkeypatch.setenv(device.CLUSTERS_ENV, "1")
    assert _ctas((1, 2, LARGEST)) == (8 if on and LOWERS else 1)


def test_clusters_are_off_by_default_and_toggle_at_each_launch(monkeypatch):
    monkeypatch.delenv(device.CLUSTERS_ENV, raising=False)
    monkeypatch.delenv(device.EMULATE_ENV, raising=False)
    assert _ctas((1, 2, LARGEST)) == 1
    monkeypatch.setenv(device.CLUSTERS_ENV, "1")
    assert _ctas((1, 2, LARGEST)) == (8 if LOWERS else 1)
    monkeypatch.setenv(device.CLUSTERS_ENV, "0")
    assert _ctas((1, 2, LARGEST)) == 1


@pytest.mark.parametrize("shape", [(1, 16, 128, 128), (2, 8, 64, 64), (1, 4, 256, 256)])
def test_channels_last_takes_no_cluster(clusters, shape):
    """Triton spreads a channels_last tile's channels over the CTAs (2-byte loads strided by C):
    such planes keep their 16-byte channel vectors and split paths."""
    assert _ctas(shape, torch.channels_last) == 1


def test_a_test_tile_limit_disables_clusters(clusters):
    with heuristics.tile_limit(16):
        assert _ctas((1, 2, LARGEST)) == 1


# ------------------------------------------------------------------------- values and gradients

@needs_lowering
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", [ONE_CTA + 1, LARGEST], ids=["2ctas_masked", "8ctas"])
def test_cluster_values_and_grads(clusters, recorded, poison, launches, dtype, hw):
    _check((1, 2, hw), dtype)
    assert ("_fwd", (2, 1), LADDER[hw], triton_p2(hw)) in recorded
    assert ("_bwd", (2, 1), LADDER[hw], triton_p2(hw)) in recorded
    assert launches("_fwd_split_stats") == launches("_bwd_split_sums") == 0


def triton_p2(n):
    return 1 << (n - 1).bit_length()


@needs_lowering
@pytest.mark.parametrize("shape", [(2, 1, 128, 128), (1, 1, 32, 32, 32)], ids=["2d_4ctas",
                                                                                "3d_4ctas"])
def test_cluster_spatial_shapes(clusters, recorded, poison, shape):
    _check(shape, torch.bfloat16, activation="leaky_relu")
    assert {r[2] for r in recorded if r[0] in ("_fwd", "_bwd")} == {_ctas(shape)} != {1}


@needs_lowering
def test_one_past_the_largest_cluster_streams(clusters, recorded, poison):
    _check((1, 2, LARGEST + 1), torch.float32)
    assert all(r[2] == 1 for r in recorded)
    assert {r[0] for r in recorded} >= {"_fwd_split_stats", "_fwd", "_bwd_split_sums", "_bwd"}


@needs_lowering
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_channels_last_values_with_clusters_on(clusters, recorded, poison, dtype):
    _check((1, 8, 64, 128), dtype, torch.channels_last)
    assert all(r[2] == 1 for r in recorded)


@needs_lowering
def test_adversarial_planes_in_a_cluster(clusters, recorded, poison):
    """A constant plane, a huge mean with a small spread, an outlier at index 0 and random data,
    in one batch of 2-CTA tiles; eps=0 on the constant plane gives exactly the bias (0), PyTorch's
    rule for var + eps == 0."""
    hw = 2 * ONE_CTA
    x = randn(1, 4, hw, seed=5)
    x[0, 0] = 3.0
    x[0, 1] = 1e4 + 1e-2 * x[0, 1]
    x[0, 2, 0] = 1e6
    x = x.float().to(DEVICE)
    y = tin.instance_norm(x)
    torch.testing.assert_close(y[0, 1:].double(), reference(x.double())[0, 1:], atol=1e-3,
                               rtol=1e-3)
    assert torch.equal(y[0, 0], torch.zeros_like(y[0, 0]))
    y0 = tin.instance_norm(x[:, :1], eps=0.0)
    assert torch.equal(y0, torch.nn.functional.instance_norm(x[:, :1].cpu(), eps=0.0).to(DEVICE))
    assert torch.equal(y0, torch.zeros_like(y0))
    assert recorded[0][2] == 2
    # bitwise the same alone or in a batch
    assert torch.equal(tin.instance_norm(x[:, 3:4]), y[:, 3:4])


@needs_lowering
def test_running_stats_and_eval_in_a_cluster(clusters, recorded, poison):
    x, _, _ = make_inputs((2, 3, 2 * ONE_CTA), torch.float32, affine=False, seed=3)
    norm = tin.InstanceNorm1d(3, affine=True, track_running_stats=True).to(DEVICE)
    ref = torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True).to(DEVICE)
    ref.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), ref(x), **TOL[torch.float32])
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)
    norm.eval(), ref.eval()
    torch.testing.assert_close(norm(x), ref(x), **TOL[torch.float32])
    assert {r[2] for r in recorded if r[0] == "_fwd"} == {2}


@needs_lowering
def test_adain_style_statistics_in_a_cluster(clusters, recorded):
    content, style = (randn(1, 2, 4 * ONE_CTA, dtype=torch.float32, seed=seed).requires_grad_()
                      for seed in (0, 1))
    out = tin.adain(content, style)
    out.sum().backward()
    c64, s64 = (t.detach().double().requires_grad_() for t in (content, style))
    mean, std = s64.mean(-1, keepdim=True), (s64.var(-1, unbiased=False, keepdim=True)
                                             + 1e-5).sqrt()
    want = F.instance_norm(c64, eps=1e-5) * std + mean
    want.sum().backward()
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])
    torch.testing.assert_close(style.grad.double(), s64.grad, **grad_tol(torch.float32,
                                                                          4 * ONE_CTA))
    assert ("_stats_bwd", (2, 1), 4, 4 * ONE_CTA) in recorded
