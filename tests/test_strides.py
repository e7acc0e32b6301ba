"""Every tensor a kernel reads or writes is addressed through its own strides.

Each argument is given as a view into a larger buffer (every other element, an offset, a
transpose), alone and all at once, in training and eval mode, forward and backward. Values are
compared with PyTorch's own instance norm on contiguous copies, and the elements of each larger
buffer outside the view must stay untouched.
"""

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL, grad_tol

import triton_instnorm as tin

N, C, H, W = 3, 4, 5, 6


def _view(shape, how, g, positive=False, requires_grad=False):
    """(view of ``shape`` into a larger random float64 buffer, that buffer). ``how``:
    "contiguous", "every_other" (stride 2 after a one-element offset along the last dim) or
    "transposed" (2-d: the transpose of a contiguous buffer). The buffer is a leaf and the view
    is taken from it, so gradients reach the buffer through the view."""
    if how == "every_other":
        base_shape = (*shape[:-1], 2 * shape[-1] + 1)
    else:
        base_shape = shape[::-1] if how == "transposed" else shape
    base = torch.randn(base_shape, generator=g, dtype=torch.float64).to(DEVICE)
    if positive:
        base = base.abs() + 0.2
    base.requires_grad_(requires_grad)
    view = {"every_other": lambda: base[..., 1::2], "transposed": lambda: base.t(),
            "contiguous": lambda: base}[how]()
    return view, base


def _outside(view, base):
    """The elements of ``base`` that ``view`` does not cover (a mask over base)."""
    mask = torch.ones(base.numel(), dtype=torch.bool, device=base.device)
    index = torch.arange(base.numel(), device=base.device).view(base.shape)
    covered = index.as_strided(view.shape, view.stride(), view.storage_offset())
    mask[covered.reshape(-1)] = False
    return base.reshape(-1)[mask]


STRIDED = ["running_mean", "running_var", "weight", "bias"]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("strided", STRIDED + ["all"])
def test_channel_vectors_are_read_through_their_own_strides(strided, training, poison, launches):
    g = torch.Generator().manual_seed(STRIDED.index(strided) if strided in STRIDED else 9)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(DEVICE)
    views, bases = {}, {}
    for name in STRIDED:
        how = "every_other" if strided in (name, "all") else "contiguous"
        views[name], bases[name] = _view((C,), how, g, positive=name == "running_var")
    before = {name: _outside(views[name], bases[name]).clone() for name in STRIDED}
    torch_running = [views["running_mean"].clone(), views["running_var"].clone()]
    y = tin.instance_norm(x, views["running_mean"], views["running_var"], views["weight"],
                          views["bias"], use_input_stats=training, momentum=0.3)
    want = F.instance_norm(x, *torch_running, views["weight"].clone(), views["bias"].clone(),
                           use_input_stats=training, momentum=0.3)
    assert launches("_fwd") == 1 and launches("_update_running_stats") == int(training)
    torch.testing.assert_close(y, want, **TOL[torch.float64])
    torch.testing.assert_close(views["running_mean"], torch_running[0], **TOL[torch.float64])
    torch.testing.assert_close(views["running_var"], torch_running[1], **TOL[torch.float64])
    for name in STRIDED:
        assert torch.equal(_outside(views[name], bases[name]), before[name]), name


@pytest.mark.parametrize("layout", ["sliced_channels", "sliced_batch", "channels_last"])
@pytest.mark.parametrize("dy_layout", ["every_other", "channels_last", "transposed"])
def test_input_and_gradient_views(layout, dy_layout, poison, launches):
    """x, dy as views (weight and bias strided too); dx and the parameter gradients against
    torch's, and the gradient buffers of the views' bases untouched outside the views."""
    g = torch.Generator().manual_seed(11)
    big = torch.randn(2 * N, 2 * C, H, W, generator=g, dtype=torch.float64).to(DEVICE)
    x = {"sliced_channels": big[:N, 1::2], "sliced_batch": big[1::2, :C],
         "channels_last": big[:N, :C].contiguous(memory_format=torch.channels_last)}[layout]
    x = x.detach().requires_grad_()  # a leaf that keeps the view's strides
    dy_base = torch.randn(N, C, H, 2 * W, generator=g, dtype=torch.float64).to(DEVICE)
    dy = {"every_other": dy_base[..., ::2],
          "channels_last": dy_base[..., :W].contiguous(memory_format=torch.channels_last),
          "transposed": dy_base[..., :W].transpose(2, 3).contiguous().transpose(2, 3)}[dy_layout]
    w_base = torch.randn(2 * C + 1, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b_base = torch.randn(2 * C + 1, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    y = tin.instance_norm(x, weight=w_base[1::2], bias=b_base[1::2], activation="silu")
    y.backward(dy)
    assert launches("_fwd") == 1 and launches("_bwd") == 1
    assert x.grad.stride() == x.stride() or layout != "channels_last"

    xr = x.detach().contiguous().requires_grad_()
    wr = w_base.detach()[1::2].clone().requires_grad_()
    br = b_base.detach()[1::2].clone().requires_grad_()
    yr = F.silu(F.instance_norm(xr, weight=wr, bias=br))
    yr.backward(dy.contiguous())
    torch.testing.assert_close(y, yr, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float64])
    torch.testing.assert_close(w_base.grad[1::2], wr.grad, **grad_tol(torch.float64, N * H * W))
    torch.testing.assert_close(b_base.grad[1::2], br.grad, **grad_tol(torch.float64, N * H * W))
    assert not w_base.grad[0::2].any() and not b_base.grad[0::2].any()


@pytest.mark.parametrize("how", ["every_other", "transposed"])
def test_adaptive_scale_and_shift_views(how, poison, launches):
    """Per-sample (N, C) scale and shift read through their strides, values and gradients."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    scale, scale_base = _view((N, C), how, g, requires_grad=True)
    shift, shift_base = _view((N, C), how, g, requires_grad=True)
    dy = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(DEVICE)
    y = tin.adaptive_instance_norm(x, scale, shift)
    y.backward(dy)
    assert launches("_fwd") == 1 and launches("_bwd") == 1

    xr = x.detach().clone().requires_grad_()
    sr, tr = scale.detach().clone().requires_grad_(), shift.detach().clone().requires_grad_()
    yr = F.instance_norm(xr) * sr[:, :, None, None] + tr[:, :, None, None]
    yr.backward(dy)
    torch.testing.assert_close(y, yr, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float64])
    for view, base, want in ((scale, scale_base, sr.grad), (shift, shift_base, tr.grad)):
        got = base.grad.as_strided(view.shape, view.stride(), view.storage_offset())
        torch.testing.assert_close(got, want, **grad_tol(torch.float64, H * W))
        assert not _outside(view, base.grad).any()
