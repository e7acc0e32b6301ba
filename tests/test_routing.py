"""enable() / disable() / enabled(): torch.nn.functional.instance_norm routed to the kernels."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, TOL

import triton_instnorm as tin
from triton_instnorm import dispatch, routing

nn = torch.nn
TORCH_FN = F.instance_norm  # PyTorch's function, as imported before any test enables routing


@pytest.fixture(autouse=True)
def _restored():
    """Every test leaves PyTorch's function in place, even when it fails half way."""
    yield
    while tin.is_enabled():
        tin.disable()
    assert F.instance_norm is TORCH_FN


class _CallsFunctional(nn.Module):
    """A third-party block that calls F.instance_norm itself."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_caller_runs_the_kernels(dtype, launches):
    torch.manual_seed(0)
    model = _CallsFunctional().to(DEVICE, dtype)
    x = torch.randn(2, 4, 5, 3, device=DEVICE, dtype=dtype, requires_grad=True)
    want = model(x)
    (dx_want,) = torch.autograd.grad(want.square().sum(), x)
    assert launches("_fwd") == 0
    with tin.enabled():
        got = model(x)
        (dx_got,) = torch.autograd.grad(got.square().sum(), x)
    assert launches("_fwd") == 1 and launches("_bwd") == 1
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(dx_got, dx_want, **TOL[dtype])


@pytest.mark.parametrize("name,shape", [("InstanceNorm1d", (3, 4, 7)),
                                        ("InstanceNorm2d", (3, 4, 5, 3)),
                                        ("InstanceNorm3d", (2, 4, 3, 2, 3))])
def test_torch_modules_train_and_eval_as_torch(name, shape, launches):
    torch.manual_seed(0)
    ref = getattr(nn, name)(4, affine=True, track_running_stats=True, momentum=0.3,
                            device=DEVICE, dtype=torch.float64)
    ours = copy.deepcopy(ref)
    batches = [torch.randn(shape, device=DEVICE, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    for module, routed in ((ref, False), (ours, True)):
        with tin.enabled() if routed else contextlib.nullcontext():
            outputs = [module.train()(x) for x in batches] + [module.eval()(batches[0])]
        module.outputs = outputs
    assert launches("_fwd") == 4 and launches("_update_running_stats") == 3
    for got, want in zip(ours.outputs, ref.outputs, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    for key, want in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, **TOL[torch.float64], msg=key)


def test_errors_are_torchs():
    x = torch.randn(2, 4, 5, device=DEVICE)
    cases = [dict(weight=torch.ones(3, device=DEVICE)),
             dict(running_mean=torch.zeros(4, device=DEVICE)),
             dict(use_input_stats=False)]
    for kwargs in cases:
        with pytest.raises(Exception) as want:
            F.instance_norm(x, **kwargs)
        with tin.enabled(), pytest.raises(want.type) as got:
            F.instance_norm(x, **kwargs)
        assert str(got.value) == str(want.value)
    with tin.enabled(), pytest.raises(ValueError, match="more than 1 spatial element"):
        F.instance_norm(torch.randn(2, 4, 1, device=DEVICE))


def test_other_inputs_go_to_torch(monkeypatch, launches):
    """Where the kernels are unavailable the replaced function runs; and our own fallback calls
    PyTorch's function, never the routed one (no recursion)."""
    monkeypatch.setattr(dispatch, "kernels_available", lambda t: False)
    calls = []
    monkeypatch.setattr(F, "instance_norm", lambda *a, **k: calls.append(1) or TORCH_FN(*a, **k))
    x = torch.randn(2, 3, 4, device=DEVICE)
    with tin.enabled():
        routed = F.instance_norm  # wraps the spy
        torch.testing.assert_close(F.instance_norm(x), TORCH_FN(x))
        assert calls == [1]
        torch.testing.assert_close(tin.instance_norm(x, activation="relu"), F.relu(TORCH_FN(x)))
        assert calls == [1] and F.instance_norm is routed
    assert launches("_fwd") == 0
    monkeypatch.undo()


class _Recorder(torch.Tensor):
    """A tensor subclass whose __torch_function__ records the functions it is handed."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_subclasses_see_the_call(launches):
    x = torch.randn(2, 3, 4, device=DEVICE)
    with tin.enabled():
        _Recorder.seen.clear()
        y = F.instance_norm(x.as_subclass(_Recorder))
        assert _Recorder.seen[0] is F.instance_norm
    assert type(y) is _Recorder
    assert launches("_fwd") == 1
    torch.testing.assert_close(y.as_subclass(torch.Tensor), TORCH_FN(x), atol=1e-5, rtol=1e-5)


def test_nesting_counts_and_restores_the_same_object():
    tin.enable()
    routed = F.instance_norm
    assert routed is not TORCH_FN and tin.is_enabled()
    tin.enable()
    with tin.enabled():
        assert F.instance_norm is routed  # nested: still the one routed function
    tin.disable()
    assert F.instance_norm is routed  # one enable() still open
    tin.disable()
    assert F.instance_norm is TORCH_FN and not tin.is_enabled()
    with pytest.raises(RuntimeError, match="without a matching enable"):
        tin.disable()
    assert F.instance_norm is TORCH_FN


def test_exceptions_inside_the_context_restore():
    with pytest.raises(KeyError):
        with tin.enabled():
            with tin.enabled():
                raise KeyError("inner")
    assert F.instance_norm is TORCH_FN and not tin.is_enabled()


def test_disable_warns_if_someone_patched_over(monkeypatch):
    tin.enable()
    F.instance_norm = lambda *a, **k: None
    with pytest.warns(RuntimeWarning, match="replaced by someone else"):
        tin.disable()
    assert F.instance_norm is TORCH_FN


def test_compile_under_enabled(launches):
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True),
                        nn.LeakyReLU(0.2), _CallsFunctional()).to(DEVICE)
    model = copy.deepcopy(ref)
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    with tin.enabled():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        y.square().sum().backward()
    assert launches("_fwd") == 2 and launches("_bwd") == 2
    y_ref = ref(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, atol=1e-4, rtol=1e-4)
    assert routing._installed is None
