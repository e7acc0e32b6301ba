"""The benchmark's providers (perf/providers.py): ours, the cluster switch, and the peers.

* Peer wiring, without the packages: stand-in ``flag_gems`` / ``liger_kernel`` modules record how
  the provider calls them, so the call (function, arguments, parameters) is checked on any
  machine; stand-ins that skip the peer's autograd Function or compute wrong values are rejected.
* Peer values, with the packages (perf tier): Liger's kernels run on Triton's interpreter
  (float32, float16) and are compared with float64 eager PyTorch on every shape class's smoke
  shapes. FlagGems cannot run on the interpreter, so its value test needs CUDA.
"""

import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from perf import providers
from perf.model import EPS
from perf.schema import CLUSTERS
from perf.shapes import SHAPE_CLASSES

ON_INTERPRETER = DEVICE == "cpu"


def installed(module):
    return importlib.util.find_spec(module) is not None


def smoke_cases():
    return [(cls.name, shape, cls.memory_format) for cls in SHAPE_CLASSES.values()
            for shape in cls.smoke_shapes]


def make_case(shape=(2, 3, 5, 7), dtype="float32", memory_format="contiguous"):
    return providers.make_case(shape, dtype, memory_format, torch.device(DEVICE))


# --------------------------------------------------------------------------- ours

@pytest.mark.parametrize("use_module", [False, True])
def test_ours_runs_the_kernels(launches, use_module):
    case = make_case((2, 3, 4, 4, 4))
    norm, inputs = providers.norm_fn("triton_instnorm", case, use_module)
    y = norm(*inputs)
    assert launches("_fwd") == 1
    want = F.instance_norm(case.x, weight=case.weight, bias=case.bias, eps=EPS)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_clusters_switch_is_the_packages():
    """providers cannot import triton_instnorm before a command decided on the interpreter, so
    it names the switch itself: the name must stay the package's."""
    from triton_instnorm import device

    assert providers.CLUSTERS_ENV == device.CLUSTERS_ENV


def test_clusters_provider_sets_its_switch_or_says_why_not(monkeypatch):
    """Either unavailable with a reason (this package or Triton launches no clusters here), or
    ours with TRITON_INSTNORM_CLUSTERS=1 while it is timed; the other providers unset it."""
    monkeypatch.setenv(providers.CLUSTERS_ENV, "1")
    case = make_case()
    providers.norm_fn("torch_eager", case)
    assert providers.CLUSTERS_ENV not in os.environ
    reason = providers.unavailable_reason(CLUSTERS, interpret=ON_INTERPRETER)
    if reason is not None:
        assert "cluster" in reason
        with pytest.raises(providers.Unavailable, match="cluster"):
            providers.norm_fn(CLUSTERS, case)
        return
    norm, inputs = providers.norm_fn(CLUSTERS, case)
    assert os.environ[providers.CLUSTERS_ENV] == "1"
    torch.testing.assert_close(norm(*inputs), F.instance_norm(case.x, weight=case.weight,
                                                              bias=case.bias, eps=EPS))
    providers.norm_fn("triton_instnorm", case)
    assert providers.CLUSTERS_ENV not in os.environ


# --------------------------------------------------------------------------- stand-ins

def _stand_in_function(module_name, qualname, drop_bias=False):
    """An autograd Function named like the peer's, computing eager instance norm."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight, bias)
            with torch.no_grad():
                return F.instance_norm(x, weight=weight, bias=None if drop_bias else bias, eps=EPS)

        @staticmethod
        def backward(ctx, dy):
            # Contiguous: torch's CPU backward is wrong for N=1 channels_last (perf/providers.py).
            x, weight, bias = (t.detach().contiguous().requires_grad_(True)
                               for t in ctx.saved_tensors)
            dy = dy.contiguous()
            with torch.enable_grad():
                y = F.instance_norm(x, weight=weight, bias=None if drop_bias else bias, eps=EPS)
                grads = torch.autograd.grad(y, (x, weight, bias), dy, allow_unused=True)
            return tuple(torch.zeros_like(t) if g is None else g
                         for t, g in zip((x, weight, bias), grads))

    Function.__module__, Function.__qualname__ = module_name, qualname
    return Function


def _install_modules(monkeypatch, modules: dict):
    for name, attrs in modules.items():
        module = types.SimpleNamespace(__name__=name, __spec__=None, **attrs)
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def fake_flag_gems(monkeypatch):
    """``flag_gems.instance_norm`` recording its calls; ``.mode`` picks what it computes."""
    calls = []
    function = _stand_in_function("flag_gems.fused.instance_norm", "InstanceNorm")
    wrong = _stand_in_function("flag_gems.fused.instance_norm", "InstanceNorm", drop_bias=True)
    state = types.SimpleNamespace(calls=calls, mode="right")

    def instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
                      use_input_stats=True, momentum=0.1, eps=1e-5):
        calls.append(dict(x=x, weight=weight, bias=bias, use_input_stats=use_input_stats, eps=eps))
        if state.mode == "eager":  # a fall back to torch: must be caught
            return F.instance_norm(x, weight=weight, bias=bias, eps=eps)
        return (wrong if state.mode == "wrong" else function).apply(x, weight, bias)

    _install_modules(monkeypatch, {"flag_gems": dict(instance_norm=instance_norm)})
    return state


@pytest.fixture
def fake_liger(monkeypatch):
    """``LigerGroupNorm`` recording its constructor arguments."""
    built = []
    function = _stand_in_function("liger_kernel.ops.group_norm", "LigerGroupNormFunction")

    class LigerGroupNorm(torch.nn.Module):
        def __init__(self, num_channels, num_groups, eps=1e-6, bias=False, init_fn="ones"):
            super().__init__()
            built.append(dict(num_channels=num_channels, num_groups=num_groups, eps=eps, bias=bias))
            self.weight = torch.nn.Parameter(torch.ones(num_channels))
            self.bias = torch.nn.Parameter(torch.zeros(num_channels))

        def forward(self, x):
            return function.apply(x, self.weight, self.bias)

    _install_modules(monkeypatch, {
        "liger_kernel": {}, "liger_kernel.transformers": {},
        "liger_kernel.transformers.group_norm": dict(LigerGroupNorm=LigerGroupNorm)})
    return built


# --------------------------------------------------------------------------- wiring

def test_flag_gems_provider_calls_instance_norm(fake_flag_gems):
    case = make_case()
    norm, inputs = providers.build_peer("flag_gems", case, interpret=False)
    assert inputs == (case.x, case.weight, case.bias)
    call = fake_flag_gems.calls[-1]
    assert call["x"] is case.x and call["weight"] is case.weight and call["bias"] is case.bias
    assert call["use_input_stats"] is True and call["eps"] == EPS
    y = norm(*inputs)
    want = F.instance_norm(case.x, weight=case.weight, bias=case.bias, eps=EPS)
    assert torch.allclose(y, want, atol=1e-6)


@pytest.mark.parametrize("mode, message", [("eager", "not flag_gems.fused.instance_norm."),
                                           ("wrong", "differs from eager PyTorch")])
def test_flag_gems_provider_rejects_fallback_and_wrong_values(fake_flag_gems, mode, message):
    fake_flag_gems.mode = mode
    with pytest.raises(providers.PeerMismatch, match=message):
        providers.build_peer("flag_gems", make_case(), interpret=False)


@pytest.mark.parametrize("memory_format, shape", [("contiguous", (2, 3, 5, 7)),
                                                  ("channels_last_3d", (1, 3, 4, 4, 4))])
def test_liger_provider_builds_group_norm_with_one_channel_per_group(fake_liger, memory_format,
                                                                     shape):
    case = make_case(shape, memory_format=memory_format)
    norm, (x, weight, bias) = providers.build_peer("liger_groupnorm", case, interpret=False)
    assert fake_liger == [dict(num_channels=shape[1], num_groups=shape[1], eps=EPS, bias=True)]
    assert x is case.x and weight is not case.weight  # the module's own parameters ...
    # ... holding the case's values
    assert torch.equal(weight, case.weight) and torch.equal(bias, case.bias)
    assert weight.dtype == case.x.dtype and weight.requires_grad


def test_missing_package_is_reported_with_its_install_command(monkeypatch):
    ghost = providers.Peer("ghost", "no_such_module_for_peers_test.sub", "pip install ghost",
                           "x.Y", None)
    monkeypatch.setitem(providers.PEERS, "ghost", ghost)
    reason = providers.unavailable_reason("ghost", interpret=False)
    assert reason == "no_such_module_for_peers_test not installed (pip install ghost)"
    with pytest.raises(providers.Unavailable, match="not installed"):
        providers.build_peer("ghost", make_case(), interpret=False)
    line = providers.status_line({"ghost": reason, "other": None})
    assert line == f"peer providers: ghost: unavailable: {reason}; other: available"


# --------------------------------------------------------------------------- values

needs_liger = pytest.mark.skipif(not installed("liger_kernel"), reason="liger-kernel not installed")
needs_flag_gems = pytest.mark.skipif(not installed("flag_gems"), reason="flag-gems not installed")
# Values on the smoke shapes: the benchmark's check, slow on the interpreter (perf tier).


@pytest.mark.perf
@needs_liger
@pytest.mark.parametrize("name, shape, memory_format", smoke_cases())
def test_liger_matches_eager_on_smoke_shapes(name, shape, memory_format):
    dtypes = ["float32", "float16"] if ON_INTERPRETER else ["float32", "bfloat16", "float16"]
    for dtype in dtypes:
        case = make_case(shape, dtype, memory_format)
        norm, inputs = providers.build_peer("liger_groupnorm", case)  # raises on a mismatch
        errors = providers.check_against_eager("liger_groupnorm", norm, inputs, case.dy)
        assert max(errors.values()) <= providers.TOLERANCES[case.x.dtype], (name, dtype, errors)


@needs_liger
@pytest.mark.skipif(not ON_INTERPRETER, reason="the interpreter's missing bfloat16 atomics")
def test_liger_bfloat16_unavailable_on_interpreter():
    with pytest.raises(providers.Unavailable, match="no bfloat16 atomics"):
        providers.build_peer("liger_groupnorm", make_case(dtype="bfloat16"))


@needs_liger
@pytest.mark.skipif(not ON_INTERPRETER, reason="interpreter adaptations")
def test_liger_interpreter_adaptations_are_undone():
    from liger_kernel.ops import group_norm
    from triton.runtime import interpreter
    before = interpreter._implicit_cvt, group_norm.rsqrt
    case = make_case()
    norm, inputs = providers.build_peer("liger_groupnorm", case)
    norm(*inputs)
    assert (interpreter._implicit_cvt, group_norm.rsqrt) == before


@needs_flag_gems
@pytest.mark.skipif(not ON_INTERPRETER, reason="on CUDA FlagGems runs: see the value test")
def test_flag_gems_on_interpreter_is_unavailable_with_reason():
    reason = providers.unavailable_reason("flag_gems", interpret=True)
    assert reason is not None and "interpreter" in reason
    with pytest.raises(providers.Unavailable, match="libentry"):
        providers.build_peer("flag_gems", make_case())


@pytest.mark.perf
@needs_flag_gems
@pytest.mark.skipif(ON_INTERPRETER, reason="FlagGems cannot run on Triton's interpreter")
@pytest.mark.parametrize("name, shape, memory_format", smoke_cases())
def test_flag_gems_matches_eager_on_smoke_shapes(name, shape, memory_format):
    for dtype in ("float32", "bfloat16", "float16"):
        case = make_case(shape, dtype, memory_format)
        norm, inputs = providers.build_peer("flag_gems", case)
        errors = providers.check_against_eager("flag_gems", norm, inputs, case.dy)
        assert max(errors.values()) <= providers.TOLERANCES[case.x.dtype], (name, dtype, errors)
