"""The peer providers of the benchmark (perf/peers.py): wiring, availability and values.

* Wiring, without the packages: stand-in ``flag_gems`` / ``liger_kernel`` modules record how the
  provider calls them, so the call (function, arguments, parameters) is checked on any machine;
  stand-ins that skip the peer's autograd Function or compute wrong values must be rejected.
* Values, with the packages: Liger's kernels run on Triton's interpreter (float32, float16; see
  perf/peers.py for the two interpreter adaptations) and are compared with float64 eager
  PyTorch on every shape class's smoke shapes. FlagGems cannot run on the interpreter
  (perf/README.md says why), so its value test needs CUDA; on the CPU its reason is checked.
"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import bench, peers  # noqa: E402
from perf.shapes import SHAPE_CLASSES  # noqa: E402

from conftest import DEVICE  # noqa: E402

EPS = bench.EPS
ON_INTERPRETER = DEVICE == "cpu"


def installed(module):
    return importlib.util.find_spec(module) is not None


def smoke_cases():
    return [(cls.name, shape, cls.memory_format) for cls in SHAPE_CLASSES.values() for shape in cls.smoke_shapes]


def make_case(shape=(2, 3, 5, 7), dtype="float32", memory_format="contiguous"):
    return bench.make_case(shape, dtype, memory_format, torch.device(DEVICE))


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
            # Contiguous: torch's CPU backward is wrong for N=1 channels_last (see perf/peers.py).
            x, weight, bias = (t.detach().contiguous().requires_grad_(True) for t in ctx.saved_tensors)
            dy = dy.contiguous()
            with torch.enable_grad():
                y = F.instance_norm(x, weight=weight, bias=None if drop_bias else bias, eps=EPS)
                grads = torch.autograd.grad(y, (x, weight, bias), dy, allow_unused=True)
            return tuple(torch.zeros_like(t) if g is None else g for t, g in zip((x, weight, bias), grads))

    Function.__module__, Function.__qualname__ = module_name, qualname
    return Function


def _install_modules(monkeypatch, modules: dict):
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__name__=name, __spec__=None, **attrs))


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
    norm, inputs = peers.build("flag_gems", case, EPS, interpret=False)
    assert inputs == (case.x, case.weight, case.bias)
    call = fake_flag_gems.calls[-1]
    assert call["x"] is case.x and call["weight"] is case.weight and call["bias"] is case.bias
    assert call["use_input_stats"] is True and call["eps"] == EPS
    y = norm(*inputs)
    assert torch.allclose(y, F.instance_norm(case.x, weight=case.weight, bias=case.bias, eps=EPS), atol=1e-6)


@pytest.mark.parametrize("mode, message", [("eager", "not flag_gems.fused.instance_norm.InstanceNorm"),
                                           ("wrong", "differs from eager PyTorch")])
def test_flag_gems_provider_rejects_fallback_and_wrong_values(fake_flag_gems, mode, message):
    fake_flag_gems.mode = mode
    with pytest.raises(peers.PeerMismatch, match=message):
        peers.build("flag_gems", make_case(), EPS, interpret=False)


@pytest.mark.parametrize("memory_format, shape", [("contiguous", (2, 3, 5, 7)), ("channels_last_3d", (1, 3, 4, 4, 4))])
def test_liger_provider_builds_group_norm_with_one_channel_per_group(fake_liger, memory_format, shape):
    case = make_case(shape, memory_format=memory_format)
    norm, (x, weight, bias) = peers.build("liger_groupnorm", case, EPS, interpret=False)
    assert fake_liger == [dict(num_channels=shape[1], num_groups=shape[1], eps=EPS, bias=True)]
    assert x is case.x and weight is not case.weight  # the module's own parameters ...
    assert torch.equal(weight, case.weight) and torch.equal(bias, case.bias)  # ... holding the case's values
    assert weight.dtype == case.x.dtype and weight.requires_grad


def test_missing_package_is_reported_with_its_install_command(monkeypatch):
    ghost = peers.Peer("ghost", "no_such_module_for_peers_test.sub", "pip install ghost", "x.Y", None)
    monkeypatch.setitem(peers.PEERS, "ghost", ghost)
    reason = peers.unavailable_reason("ghost", interpret=False)
    assert reason == "no_such_module_for_peers_test not installed (pip install ghost)"
    with pytest.raises(peers.Unavailable, match="not installed"):
        peers.build("ghost", make_case(), EPS, interpret=False)
    line = peers.status_line({"ghost": reason, "other": None})
    assert line == f"peer providers: ghost: unavailable: {reason}; other: available"


# --------------------------------------------------------------------------- values

needs_liger = pytest.mark.skipif(not installed("liger_kernel"), reason="liger-kernel not installed")
needs_flag_gems = pytest.mark.skipif(not installed("flag_gems"), reason="flag-gems not installed")


@needs_liger
@pytest.mark.parametrize("name, shape, memory_format", smoke_cases())
def test_liger_matches_eager_on_smoke_shapes(name, shape, memory_format):
    dtypes = ["float32", "float16"] if ON_INTERPRETER else ["float32", "bfloat16", "float16"]
    for dtype in dtypes:
        case = make_case(shape, dtype, memory_format)
        norm, inputs = peers.build("liger_groupnorm", case, EPS)  # raises on a mismatch
        errors = peers.check_against_eager("liger_groupnorm", norm, inputs, case.dy, EPS)
        assert max(errors.values()) <= peers.TOLERANCES[case.x.dtype], (name, dtype, errors)


@needs_liger
@pytest.mark.skipif(not ON_INTERPRETER, reason="the interpreter's missing bfloat16 atomics")
def test_liger_bfloat16_unavailable_on_interpreter():
    with pytest.raises(peers.Unavailable, match="no bfloat16 atomics"):
        peers.build("liger_groupnorm", make_case(dtype="bfloat16"), EPS)


@needs_liger
@pytest.mark.skipif(not ON_INTERPRETER, reason="interpreter adaptations")
def test_liger_interpreter_adaptations_are_undone():
    from liger_kernel.ops import group_norm
    from triton.runtime import interpreter
    before = interpreter._implicit_cvt, group_norm.rsqrt
    case = make_case()
    norm, inputs = peers.build("liger_groupnorm", case, EPS)
    norm(*inputs)
    assert (interpreter._implicit_cvt, group_norm.rsqrt) == before


@needs_flag_gems
@pytest.mark.skipif(not ON_INTERPRETER, reason="on CUDA FlagGems runs: see the value test")
def test_flag_gems_on_interpreter_is_unavailable_with_reason():
    reason = peers.unavailable_reason("flag_gems", interpret=True)
    assert reason is not None and "interpreter" in reason
    with pytest.raises(peers.Unavailable, match="libentry"):
        peers.build("flag_gems", make_case(), EPS)


@needs_flag_gems
@pytest.mark.skipif(ON_INTERPRETER, reason="FlagGems cannot run on Triton's interpreter (perf/README.md)")
@pytest.mark.parametrize("name, shape, memory_format", smoke_cases())
def test_flag_gems_matches_eager_on_smoke_shapes(name, shape, memory_format):
    for dtype in ("float32", "bfloat16", "float16"):
        case = make_case(shape, dtype, memory_format)
        norm, inputs = peers.build("flag_gems", case, EPS)
        errors = peers.check_against_eager("flag_gems", norm, inputs, case.dy, EPS)
        assert max(errors.values()) <= peers.TOLERANCES[case.x.dtype], (name, dtype, errors)
