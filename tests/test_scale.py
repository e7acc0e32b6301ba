"""Extremes of size: hundreds of thousands of planes, > 2^31 elements, CUDA graph capture."""

import pytest
import torch
from utils import DEVICE, reference

import triton_instnorm as tin

cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def test_hundreds_of_thousands_of_planes(launches):
    x = torch.randn(1000, 200, 3, device=DEVICE) * 2 + 1  # N*C = 200,000 planes of 3 elements
    w = torch.randn(200, device=DEVICE)
    y = tin.instance_norm(x, weight=w)
    assert launches("_fwd") == 1
    torch.testing.assert_close(y.double(), reference(x, w), atol=2e-5, rtol=2e-5)


def test_grid_is_bounded():
    x = torch.empty(1000, 200, 3)
    plan = tin.explain(x).plans["forward"]
    row_programs, chunks = plan.passes[-1].grid
    assert chunks == 1 and row_programs < 2**31 and row_programs * plan.config.BLOCK_R >= 200_000


@cuda_only
def test_cuda_graph_capture():
    """No host synchronization anywhere on the CUDA path: the whole step captures."""
    m = tin.InstanceNorm2d(8, affine=True, track_running_stats=True).cuda()
    x = torch.randn(4, 8, 32, 32, device="cuda", requires_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up compiles the kernels outside the capture
            m(x).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = m(x)
        y.sum().backward()
    x.data.copy_(torch.randn_like(x) * 3 + 1)
    rm_before = m.running_mean.clone()
    g.replay()
    torch.cuda.synchronize()
    want = reference(x.detach(), m.weight.detach(), m.bias.detach())
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
    assert not torch.equal(m.running_mean, rm_before)


@cuda_only
@pytest.mark.slow
def test_more_than_2_to_the_31_elements():
    """64-bit offsets: a bfloat16 tensor of 2^31 + 2^20 elements (4 GiB), checked at its end."""
    hw = 2**20
    n = 2**11 + 1
    x = torch.randn(n, 1, hw, device="cuda", dtype=torch.bfloat16)
    y = tin.instance_norm(x)
    tail = x[-2:].float()
    torch.testing.assert_close(y[-2:].double(), reference(tail), atol=3e-2, rtol=3e-2)
    del x, y
