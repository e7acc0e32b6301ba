"""Running statistics: the in-place update, train/eval over several steps, every momentum."""

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE

import triton_instnorm as tin

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, -0.5, 1.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_matches_torch(momentum, dtype, poison, launches):
    g = torch.Generator().manual_seed(0)
    rm_t = torch.randn(5, generator=g, dtype=dtype).to(DEVICE)
    rv_t = (torch.rand(5, generator=g, dtype=dtype) + 0.5).to(DEVICE)
    rm, rv = rm_t.clone(), rv_t.clone()
    for step in range(3):
        x = (torch.randn(4, 5, 6, 3, generator=g, dtype=dtype) * (step + 1) + step).to(DEVICE)
        y = tin.instance_norm(x, rm, rv, momentum=momentum)
        y_t = F.instance_norm(x, rm_t, rv_t, momentum=momentum)
        torch.testing.assert_close(y, y_t, **TOL[dtype])
        torch.testing.assert_close(rm, rm_t, **TOL[dtype])
        torch.testing.assert_close(rv, rv_t, **TOL[dtype])
    assert launches("_update_running_stats") == 3


def test_update_definition_float64():
    """Batch mean of per-instance means and of per-instance *unbiased* variances."""
    x = torch.randn(3, 2, 7, dtype=torch.float64, device=DEVICE) + 2
    rm = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    rv = torch.ones(2, dtype=torch.float64, device=DEVICE)
    tin.instance_norm(x, rm, rv, momentum=0.25)
    want_m = 0.25 * x.mean(2).mean(0)
    want_v = 0.75 + 0.25 * x.var(2, unbiased=True).mean(0)
    torch.testing.assert_close(rm, want_m, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(rv, want_v, atol=1e-14, rtol=1e-14)


def test_half_input_float32_running_stats():
    x = torch.randn(2, 3, 20, device=DEVICE).half()
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    rm_t, rv_t = rm.clone(), rv.clone()
    tin.instance_norm(x, rm, rv)
    F.instance_norm(x, rm_t, rv_t)
    assert rm.dtype == torch.float32
    # float32 statistics of the half values: exact to float32 rounding against float64.
    x64 = x.double()
    torch.testing.assert_close(rm.double(), 0.1 * x64.mean(2).mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * x64.var(2).mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rm, rm_t, **TOL[torch.float16])  # eager keeps less precision
    torch.testing.assert_close(rv, rv_t, **TOL[torch.float16])


def test_strided_running_stats_updated_in_place():
    base_m = torch.zeros(6, device=DEVICE)
    base_v = torch.ones(6, device=DEVICE)
    x = torch.randn(2, 3, 5, device=DEVICE) + 1
    tin.instance_norm(x, base_m[::2], base_v[::2])
    want_m, want_v = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    F.instance_norm(x, want_m[::2], want_v[::2])
    torch.testing.assert_close(base_m, want_m, **TOL[torch.float32])
    torch.testing.assert_close(base_v, want_v, **TOL[torch.float32])


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0, -0.2])
def test_module_train_eval_steps(momentum):
    torch.manual_seed(1)
    kw = dict(momentum=momentum, affine=True, track_running_stats=True)
    ours, ref = tin.InstanceNorm2d(4, **kw).to(DEVICE), torch.nn.InstanceNorm2d(4, **kw).to(DEVICE)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 4))
            m.bias.copy_(torch.linspace(-1, 1, 4))
    for step in range(3):
        x = torch.randn(3, 4, 5, 6, device=DEVICE) * 0.5 + step  # var stays > 0 for momentum < 0
        torch.testing.assert_close(ours(x), ref(x), **TOL[torch.float32])
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL[torch.float32])
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL[torch.float32])
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
    ours.eval()
    ref.eval()
    x = torch.randn(2, 4, 5, 6, device=DEVICE)
    torch.testing.assert_close(ours(x), ref(x), **TOL[torch.float32])
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL[torch.float32])


def test_momentum_none_never_updates():
    m = tin.InstanceNorm1d(3, momentum=None, track_running_stats=True).to(DEVICE)
    m(torch.randn(4, 3, 10, device=DEVICE) + 5)
    assert torch.equal(m.running_mean, torch.zeros(3, device=DEVICE))
    assert torch.equal(m.running_var, torch.ones(3, device=DEVICE))


def test_empty_batch_and_empty_planes_match_torch():
    for shape in [(0, 3, 4), (2, 3, 0)]:
        rm, rv = torch.full((3,), 0.5, device=DEVICE), torch.full((3,), 2.0, device=DEVICE)
        rm_t, rv_t = rm.clone(), rv.clone()
        x = torch.randn(shape, device=DEVICE)
        y = tin.instance_norm(x, rm, rv)
        y_t = F.instance_norm(x, rm_t, rv_t)
        assert y.shape == y_t.shape
        torch.testing.assert_close(rm, rm_t, equal_nan=True)
        torch.testing.assert_close(rv, rv_t, equal_nan=True)


@pytest.mark.parametrize("dtype, outlier", [(torch.float32, 1e21), (torch.float64, 1e155)])
def test_update_of_a_variance_near_the_top_of_the_range(dtype, outlier):
    """One outlier in 4096 elements: the plane's deltas are scaled (inv_scale = 1 / outlier), its
    unbiased variance ~ outlier^2 / 4096 is finite but close to the dtype's largest value. The
    update must not lose it: not by dividing by inv_scale^2 (subnormal here, 0 from an outlier of
    ~4e22 in float32), nor by multiplying the variance by HW or summing it over n before
    averaging."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 64, 64, generator=g, dtype=dtype)
    x[:, :, 17, 5] = outlier
    x = x.to(DEVICE)
    rm, rv = torch.zeros(2, dtype=dtype, device=DEVICE), torch.ones(2, dtype=dtype, device=DEVICE)
    tin.instance_norm(x, rm, rv, momentum=0.5)
    x64 = x.double()
    want_m = 0.5 * x64.mean((2, 3)).mean(0)
    want_v = 0.5 + 0.5 * (x64 / outlier).var((2, 3)).mean(0) * outlier * outlier  # no overflow
    assert torch.isfinite(rv).all()
    torch.testing.assert_close(rm.double(), want_m, atol=0, rtol=1e-5)
    torch.testing.assert_close(rv.double(), want_v, atol=0, rtol=1e-5)
