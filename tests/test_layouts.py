"""Any memory layout or strided view gives correct values and gradients."""

import pytest
import torch
from utils import DEVICE, TOL, randn, reference

import triton_instnorm as tin
from triton_instnorm import launch

VIEWS = {
    "channels_last": randn(2, 5, 4, 3, seed=0).to(memory_format=torch.channels_last),
    "channels_last_3d": randn(2, 5, 3, 4, 2, seed=1).to(memory_format=torch.channels_last_3d),
    "transposed_spatial": randn(2, 5, 4, 6, seed=2).transpose(2, 3),
    "transposed_nc": randn(5, 2, 7, seed=3).transpose(0, 1),
    "sliced_channels": randn(2, 10, 6, seed=4)[:, ::2],
    "sliced_spatial": randn(2, 5, 12, seed=5)[..., 1::3],
    "sliced_batch": randn(6, 5, 4, 4, seed=6)[1:5:2],
    "expanded_batch": randn(1, 5, 9, seed=7).expand(3, 5, 9),
    "single_channel": randn(4, 1, 11, seed=8),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_values_and_grads_on_views(name, poison):
    x = VIEWS[name]
    c = x.shape[1]
    w = torch.randn(2 * c, dtype=torch.float64, device=DEVICE)[::2]  # strided parameters too
    b = torch.randn(c, dtype=torch.float64, device=DEVICE)
    xo = x.detach().clone(memory_format=torch.preserve_format).requires_grad_() \
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) \
        or x.is_contiguous(memory_format=torch.channels_last_3d) else x.detach().requires_grad_()
    wo, bo = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = tin.instance_norm(xo, weight=wo, bias=bo)
    x64 = x.detach().contiguous().requires_grad_()
    w64, b64 = w.clone().requires_grad_(), b.clone().requires_grad_()
    y64 = reference(x64, w64, b64)
    torch.testing.assert_close(y, y64, **TOL[torch.float64])
    dy = torch.randn_like(y64)
    y.backward(dy)
    y64.backward(dy)
    torch.testing.assert_close(xo.grad, x64.grad, **TOL[torch.float64])
    torch.testing.assert_close(wo.grad, w64.grad, **TOL[torch.float64])
    torch.testing.assert_close(bo.grad, b64.grad, **TOL[torch.float64])


@pytest.mark.parametrize("fmt,shape", [(torch.channels_last, (2, 6, 5, 3)),
                                       (torch.channels_last_3d, (2, 6, 3, 2, 4))])
def test_channels_last_is_native(fmt, shape, monkeypatch):
    """channels_last input is normalized in its layout: no copy, output keeps the format."""
    x = torch.randn(shape, device=DEVICE).to(memory_format=fmt)
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("layout copy"))
    y = tin.instance_norm(x)
    monkeypatch.undo()
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, reference(x).float(), **TOL[torch.float32])


def test_non_flattenable_view_is_copied_once(monkeypatch):
    """A view whose spatial dims do not flatten (transposed) is copied once for the forward and
    the backward together: the backward reads the copy the forward made."""
    x = VIEWS["transposed_spatial"].detach().requires_grad_()
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda t, *a, **k: copies.append(t.shape) or contiguous(t, *a, **k))
    y = tin.instance_norm(x)
    y.backward(torch.randn_like(y))
    monkeypatch.undo()
    assert copies == [x.shape]
    torch.testing.assert_close(y, reference(x.detach()), **TOL[torch.float64])


def test_planes_view_folds_batch_into_channels():
    x = torch.randn(3, 4, 5, 6)
    p = launch.planes(x, launch.can_fold(x))
    assert (p.groups, p.rows_per_group, p.hw, p.row_stride, p.spatial_stride) == (1, 12, 30, 30, 1)
    xc = x.to(memory_format=torch.channels_last)
    p = launch.planes(xc, launch.can_fold(xc))
    assert (p.groups, p.rows_per_group, p.group_stride, p.row_stride, p.spatial_stride) == (
        3, 4, 120, 1, 4)
    assert launch._spatial_stride(x.transpose(2, 3)) is None
