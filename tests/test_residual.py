"""The fused residual add: ``act(instance_norm(x) + residual)`` in the forward kernel, the
residual's gradient from the backward kernel; values and gradients against float64 on every path
(one tile, looped, split, channels_last, cluster, given statistics), double backward, the module
and operator interfaces, errors."""

import contextlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL, grad_tol, make_inputs, randn_like, reference

import triton_instnorm as tin
from triton_instnorm import device, heuristics
from triton_instnorm.functional import apply_activation

F64 = torch.float64


def _split():
    stack = contextlib.ExitStack()
    stack.enter_context(heuristics.tile_limit(16))
    stack.enter_context(heuristics.split_planes(48))
    return stack


def _clusters(monkeypatch):
    monkeypatch.setenv(device.EMULATE_ENV, "h100")
    monkeypatch.setenv(device.CLUSTERS_ENV, "1")
    return contextlib.nullcontext()


# path: (shape, memory format, context, the forward kernels launched besides _fwd)
PATHS = {
    "tile": ((2, 3, 6, 5), torch.contiguous_format, lambda mp: contextlib.nullcontext()),
    "looped": ((2, 3, 6, 5), torch.contiguous_format, lambda mp: heuristics.tile_limit(8)),
    "split": ((1, 2, 100), torch.contiguous_format, lambda mp: _split()),
    "channels_last": ((2, 4, 3, 5), torch.channels_last, lambda mp: contextlib.nullcontext()),
    "cluster": ((1, 2, heuristics.MAX_SINGLE_TILE + 8), torch.contiguous_format, _clusters),
}


def _residual_reference(x, w, b, r, activation, slope=0.2, **kw):
    return apply_activation(reference(x, w, b, **kw) + r.double(), activation, slope)


def _run(fn, x, w, b, r, dy):
    """(y, dx, dweight, dbias, dresidual) of ``fn`` on leaf copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def _check(shape, dtype, activation, memory_format=torch.contiguous_format,
           residual_format=None):
    x, w, b = make_inputs(shape, dtype, memory_format=memory_format)
    r = randn_like(x, seed=2).contiguous(memory_format=residual_format or memory_format) * 3
    dy = randn_like(x, seed=1)
    ours = _run(lambda x, w, b, r: tin.instance_norm(
        x, weight=w, bias=b, activation=activation, negative_slope=0.2, residual=r), x, w, b, r,
        dy)
    exact = _run(lambda x, w, b, r: _residual_reference(x, w, b, r, activation),
                 *(t.double() for t in (x, w, b, r)), dy.double())
    hw = x[0, 0].numel()
    tols = [TOL[dtype], grad_tol(dtype, hw), grad_tol(dtype, shape[0] * hw),
            grad_tol(dtype, shape[0] * hw), TOL[dtype]]
    assert ours[0].is_contiguous(memory_format=memory_format)
    for got, want, tol in zip(ours, exact, tols, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("activation", [None, "leaky_relu", "gelu"])
@pytest.mark.parametrize("path", PATHS)
def test_values_and_grads_every_path(path, activation, poison, launches, monkeypatch):
    shape, memory_format, context = PATHS[path]
    with context(monkeypatch):
        _check(shape, F64, activation, memory_format)
    # no separate add or activation: one normalize pass forward, one dx pass backward
    assert launches("_fwd") == 1 and launches("_bwd") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu", "relu"])
def test_half_and_single_precision(dtype, activation, poison):
    _check((2, 3, 7, 4), dtype, activation)


def test_residual_in_another_layout(poison):
    """The residual is read through its own strides."""
    _check((2, 4, 3, 5), F64, "leaky_relu", torch.channels_last, torch.contiguous_format)
    _check((2, 4, 3, 5), F64, None, torch.contiguous_format, torch.channels_last)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_given_statistics(activation, poison):
    x, w, b = make_inputs((2, 3, 9), F64)
    r = randn_like(x, seed=3)
    rm, rv = torch.randn(3, dtype=F64, device=DEVICE), torch.rand(3, dtype=F64, device=DEVICE) + 1
    y = tin.instance_norm(x, rm, rv, w, b, use_input_stats=False, activation=activation,
                          residual=r)
    want = _residual_reference(x, w, b, r, activation, 0.01, running_mean=rm, running_var=rv,
                               use_input_stats=False)
    torch.testing.assert_close(y, want, **TOL[F64])


@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck_and_double_backward(activation):
    x, w, b = make_inputs((2, 2, 5), F64, seed=1, requires_grad=True)
    r = randn_like(x, seed=4).requires_grad_()

    def fn(x, w, b, r):
        return tin.instance_norm(x, weight=w, bias=b, activation=activation, residual=r)

    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("unbatched", [False, True])
def test_module(unbatched, launches):
    torch.manual_seed(0)
    norm = tin.InstanceNorm2d(3, affine=True, activation="leaky_relu", negative_slope=0.1)
    ref = torch.nn.InstanceNorm2d(3, affine=True)
    norm, ref = norm.to(DEVICE, F64), ref.to(DEVICE, F64)
    shape = (3, 4, 5) if unbatched else (2, 3, 4, 5)
    x, skip = (torch.randn(shape, dtype=F64, device=DEVICE) for _ in range(2))
    torch.testing.assert_close(norm(x, residual=skip), F.leaky_relu(ref(x) + skip, 0.1),
                               **TOL[F64])
    assert launches("_fwd") == 1


def test_module_checks_as_torch():
    norm = tin.InstanceNorm2d(3, affine=True)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="match num_features"):
        norm(x, residual=x)
    with pytest.raises(ValueError, match="expected 3D or 4D input"):
        norm(x[0, 0], residual=x[0, 0])


def test_errors():
    x = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(TypeError, match="argument 'residual' must be Tensor, not float"):
        tin.instance_norm(x, residual=1.0)
    for other in (x[:, :2], x.double(), x.unsqueeze(-1)):
        with pytest.raises(RuntimeError, match="residual must have the input's shape, dtype"):
            tin.instance_norm(x, residual=other)


def test_operator_with_residual():
    """The custom operator (what compile, export and the transforms see): opcheck, and a
    compiled function gives the eager values."""
    x, w, b = make_inputs((2, 3, 5, 4), F64, requires_grad=True)
    r = randn_like(x, seed=5).requires_grad_()
    ops = torch.ops.triton_instnorm
    for act in (0, 2):
        torch.library.opcheck(ops.forward.default, (x, w, b, None, None, True, 1e-5, act, 0.2,
                                                    r))
    def fn(x, r):
        return tin.instance_norm(x, weight=w, bias=b, activation="silu", residual=r)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, r), fn(x, r), **TOL[F64])


class _ResidualTail(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = tin.InstanceNorm2d(3, affine=True, activation="leaky_relu")

    def forward(self, x, skip):
        return self.norm(x, residual=skip)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export(dynamo, tmp_path):
    """Both exporters write the residual as an Add before the activation."""
    test_onnx = pytest.importorskip("test_onnx")
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        pytest.skip("needs the onnx extra")
    model = _ResidualTail().to(DEVICE).eval()
    args = (torch.randn(2, 3, 5, 4, device=DEVICE), torch.randn(2, 3, 5, 4, device=DEVICE))
    (got,), op_types = test_onnx._export(model, args, dynamo, tmp_path / "residual.onnx")
    assert "Add" in op_types and op_types.index("Add") < op_types.index("LeakyRelu")
    torch.testing.assert_close(got, model(*args).cpu(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_residual_without_grad_still_enters_dz(activation):
    """A residual that needs no gradient (a constant added before the activation): the
    backward still recomputes z with it, so dx and dweight are those of act(x_hat + r)."""
    x, w, b = make_inputs((2, 3, 6, 5), torch.float32, requires_grad=True)
    r = randn_like(x, seed=2) * 3
    dy = randn_like(x, seed=1)
    y = tin.instance_norm(x, weight=w, bias=b, activation=activation, residual=r)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = _residual_reference(x64, w64, b64, r, activation)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    torch.testing.assert_close(dx.double(), dx64, **TOL[torch.float32])
    torch.testing.assert_close(dw.double(), dw64, **grad_tol(torch.float32, 2 * 6 * 5))
