"""The eager host path: outside tracing the layers skip the custom ops' dispatcher, with the
operators' results and autograd behaviour; anything that traces or intercepts sees the ops."""

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from utils import DEVICE, make_inputs

import triton_instnorm as tin
from triton_instnorm import ops

OPS = torch.ops.triton_instnorm


class _PassThrough(TorchFunctionMode):
    """Intercepts nothing, but makes every call go through the operators."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def _step(ctx, activation):
    x, w, b = make_inputs((2, 3, 5, 4), requires_grad=True)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(2, 3, 5, 4, generator=g).to(DEVICE)
    style = torch.randn(2, 3, 4, 4, generator=g).to(DEVICE).requires_grad_(True)
    with ctx:
        y = tin.instance_norm(x, rm, rv, w, b, activation=activation)
        grads = torch.autograd.grad(y, (x, w, b), dy)
        z = tin.adain(x, style)
        style_grad = torch.autograd.grad(z.sum(), style)
    return (y, *grads, rm, rv, z, *style_grad)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_eager_path_is_bitwise_the_operators(activation, launches):
    eager = _step(torch.enable_grad(), activation)
    through_ops = _step(_PassThrough(), activation)
    for a, b in zip(eager, through_ops, strict=True):
        assert torch.equal(a, b)
    assert launches("_fwd") == 6 and launches("_bwd") == 4 and launches("_stats_bwd") == 2


def test_eager_path_skips_the_operators(monkeypatch, launches):
    def refuse(*args, **kwargs):
        raise AssertionError("operator called in plain eager mode")

    for name in ("forward_op", "backward_op", "update_running_stats_op", "plane_stats_op",
                 "stats_backward_op"):
        monkeypatch.setattr(ops, name, refuse)
    m = tin.InstanceNorm2d(3, affine=True, track_running_stats=True, device=DEVICE)
    x = torch.randn(2, 3, 5, 4, device=DEVICE, requires_grad=True)
    m(x).sum().backward()
    with torch.no_grad():
        m(x)
    style = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    tin.adain(x, style).sum().backward()
    assert launches("_fwd") == 4 and launches("_bwd") == 2 and launches("_stats_bwd") == 1


def test_dispatch_modes_see_the_operators():
    m = tin.InstanceNorm2d(3, affine=True, track_running_stats=True, device=DEVICE)
    x = torch.randn(2, 3, 5, 4, device=DEVICE, requires_grad=True)
    with _Recorder() as rec:
        m(x).sum().backward()
    assert {OPS.forward.default, OPS.update_running_stats.default,
            OPS.backward.default} <= set(rec.seen)


@pytest.mark.parametrize("through_ops", [False, True], ids=["eager", "operators"])
def test_autograd_behaviour(through_ops):
    """Saved tensors checked for in-place changes, non-differentiable statistics, gradients only
    where asked for, the running statistics' version bumped: on both paths alike."""
    ctx = _PassThrough() if through_ops else torch.enable_grad()
    x, w, b = make_inputs((2, 3, 5, 4), requires_grad=True)
    with ctx:
        h = x * 1
        y = tin.instance_norm(h, weight=w, bias=b)
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()

        w.requires_grad_(False)
        y = tin.instance_norm(x, weight=w, bias=b)
        assert y.requires_grad and y.grad_fn is not None
        dx, db = torch.autograd.grad(y.square().sum(), (x, b))
        assert dx.shape == x.shape and db.shape == b.shape
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(tin.instance_norm(x, weight=w).sum(), w)

        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        versions = rm._version, rv._version
        with torch.no_grad():
            y = tin.instance_norm(x, rm, rv)
        assert (rm._version, rv._version) == (versions[0] + 1, versions[1] + 1)
        assert not y.requires_grad

        y, stats = ops.forward(x, w, b, None, None, use_input_stats=True, eps=1e-5,
                               activation=0, negative_slope=0.01, store_stats=True)
        assert y.requires_grad and not stats.requires_grad


def _layouts():
    base = torch.randn(4, 6, 10, 12, device=DEVICE)
    return [base, base.to(memory_format=torch.channels_last), base[:, 1:5, 2:9],
            base[1:3].transpose(2, 3).contiguous(), base[:, :1]]


@pytest.mark.parametrize("i", range(5))
def test_cached_layout_is_the_computed_one(i):
    """launch.layout (cached per op, flags, shape, strides, dtype, GPU and the heuristics' test
    hooks) gives what planes() and heuristics.plan() give for the tensors themselves."""
    from triton_instnorm import device, heuristics, launch

    x = launch.kernel_layout(_layouts()[i])
    y = torch.empty_like(x)
    flags = (True, True, True, False, 0)  # a training forward writing y and the statistics
    for hook in (contextlib.nullcontext(), heuristics.tile_limit(64),
                 heuristics.split_planes(16)):
        with hook:
            lay = launch.layout(heuristics.FORWARD, flags, x, y, None)
            fold = launch.can_fold(x) and launch.can_fold(y)
            px = launch.planes(x, fold)
            assert lay.fold == fold and lay.planes == px
            problem = heuristics.Problem(heuristics.FORWARD, *x.shape[:2], px.hw, px.groups,
                                         px.rows_per_group, px.row_stride == 1 and px.hw > 1,
                                         x.dtype, *flags)
            assert lay.plan == heuristics.plan(problem, device.describe(x.device))
            for t, strides in zip((x, y), lay.strides[:2], strict=True):
                assert (t, *strides) == launch.planes_view(t, fold)
            assert lay.strides[2] is None


def _wrong_statistics():
    """Buffers a forward of (2, 3, ...) in float32 does not write: none (a graph captured without
    grad kept an empty placeholder), another plane count, the planes in one flat row, another
    dtype (float16: no forward writes it; float64 is a float64 input's)."""
    return [torch.empty(0, device=DEVICE), torch.zeros(4, 5, device=DEVICE),
            torch.zeros(4, 6, device=DEVICE),
            torch.zeros(4, 2, 3, dtype=torch.float16, device=DEVICE)]


@pytest.mark.parametrize("through_ops", [False, True], ids=["eager", "operators"])
@pytest.mark.parametrize("i", range(len(_wrong_statistics())))
def test_passes_refuse_statistics_their_forward_did_not_write(i, through_ops, launches):
    """Every pass that reads the statistics checks on the host that it was given the buffer its
    forward writes, and raises instead of launching a kernel that would read past it."""
    stats = _wrong_statistics()[i]
    x, w, b = make_inputs((2, 3, 5, 4))
    dy = torch.ones_like(x)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    calls = {
        "backward": lambda: ops.backward(dy, x, w, b, stats, use_input_stats=True, eps=1e-5,
                                         activation=0, negative_slope=0.01, need_dw=True,
                                         need_db=True),
        "update_running_stats": lambda: ops.update_running_stats(stats, rm, rv, n=2, c=3, hw=20,
                                                                 momentum=0.1),
        "stats_backward": lambda: ops.stats_backward(torch.ones(2, 3, device=DEVICE),
                                                     torch.ones(2, 3, device=DEVICE), x, stats,
                                                     eps=1e-5),
    }
    with _PassThrough() if through_ops else contextlib.nullcontext():
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match=f"triton_instnorm::{name}: expected the "
                                                   "statistics a forward of 2 x 3 planes writes"):
                call()
    assert launches("_bwd") == launches("_update_running_stats") == launches("_stats_bwd") == 0


def test_operator_keeps_statistics_whatever_the_grad_mode():
    """No argument of the forward operator says whether autograd records it: the statistics the
    backward reads are written whenever the operator runs, with or without grad."""
    x, w, b = make_inputs((2, 3, 5, 4))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            _, stats = OPS.forward(x, w, b, None, None, True, 1e-5, 0, 0.01)
        assert stats.shape == (4, 2, 3) and stats.dtype == torch.float32
