"""The argument values PyTorch's ``F.instance_norm`` accepts, and what it raises for the others.

Each case runs through torch and through ours (the function, the modules, and torch's own
function and module under ``enabled()``): the same outcome, values (output and running
statistics) within tolerance, or the same exception type and message, running statistics left
as torch leaves them. torch decides what is expected, here, on every run.
"""

import contextlib
import decimal
import fractions
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, make_inputs

import triton_instnorm as tin

TORCH_FN = F.instance_norm
TOL = dict(atol=1e-5, rtol=1e-5)


def _x(n=2, c=3):
    return make_inputs((n, c, 5, 4), affine=False, seed=n * 10 + c)[0]


def _running_pair(c=3, shape=None):
    shape = (c,) if shape is None else shape
    return torch.full(shape, 0.5, device=DEVICE), torch.full(shape, 2.0, device=DEVICE)


# name: (input, the call's keyword arguments). Running statistics are made per call.
MOMENTUM = {
    "np.float32": np.float32(0.3),
    "np.float16": np.float16(0.5),
    "np.int64": np.int64(1),
    "np.bool_": np.bool_(True),
    "np.complex64": np.complex64(0.25),
    "0-dim float tensor": torch.tensor(0.3),
    "0-dim int tensor": torch.tensor(1),
    "0-dim bool tensor": torch.tensor(True),
    "0-dim double tensor": torch.tensor(0.3, dtype=torch.float64),
    "0-dim complex tensor, real value": torch.tensor(0.3 + 0j),
    "0-dim complex tensor": torch.tensor(0.3 + 1j),
}
EPS = {
    "str number": "0.001",
    "str": "x",
    "Decimal": decimal.Decimal("0.001"),
    "Fraction": fractions.Fraction(1, 1000),
    "0-dim ndarray": np.array(1e-3),
    "1-element tensor": torch.tensor([1e-3]),
    "0-dim tensor requiring grad": torch.tensor(1e-3, requires_grad=True),
}
USE_INPUT_STATS = {"1": 1, "0": 0, "np.bool_": np.bool_(True),
                   "0-dim bool tensor": torch.tensor(True), "None": None, "str": "yes",
                   "float": 1.0}


def _case(x, running=None, **kwargs):
    return x, running, kwargs


CASES = {
    **{f"momentum {k}": _case(_x(), "running", momentum=v) for k, v in MOMENTUM.items()},
    **{f"eps {k}": _case(_x(), eps=v) for k, v in EPS.items()},
    **{f"use_input_stats {k}": _case(_x(), "running", use_input_stats=v)
       for k, v in USE_INPUT_STATS.items()},
    "weight list": _case(_x(), weight=[1.0, 1.0, 1.0]),
    "running_mean ndarray, eval": _case(_x(), use_input_stats=False, running_mean=np.zeros(3),
                                        running_var=torch.ones(3, device=DEVICE)),
    # C == 1: torch repeats the parameters N times, so 0-dim ones are taken.
    "0-dim weight, C=1": _case(_x(c=1), weight=torch.tensor(1.5, device=DEVICE)),
    "0-dim bias, C=1": _case(_x(c=1), bias=torch.tensor(-0.5, device=DEVICE)),
    "0-dim weight and bias, C=1": _case(_x(c=1), weight=torch.tensor(1.5, device=DEVICE),
                                        bias=torch.tensor(-0.5, device=DEVICE)),
    "0-dim running stats, C=1, eval": _case(_x(c=1), "0-dim running", use_input_stats=False),
    "0-dim running stats, C=1, train": _case(_x(c=1), "0-dim running"),
    "0-dim running_var, C=1, train": _case(_x(c=1), "0-dim running_var"),
    # An empty batch: torch's batch norm of the empty input indexes the (empty) repeated weight.
    "empty batch, weight": _case(_x(n=0), weight=torch.ones(3, device=DEVICE)),
    "empty batch, bias": _case(_x(n=0), bias=torch.zeros(3, device=DEVICE)),
    "empty batch, weight, running stats": _case(_x(n=0), "running",
                                                weight=torch.ones(3, device=DEVICE)),
    "empty batch, bias, eval": _case(_x(n=0), "running", use_input_stats=False,
                                     bias=torch.zeros(3, device=DEVICE)),
}


def _running(kind, c):
    if kind is None:
        return {}
    if kind == "running":
        rm, rv = _running_pair(c)
    elif kind == "0-dim running":
        rm, rv = _running_pair(shape=())
    else:  # "0-dim running_var"
        rm, rv = _running_pair(c)[0], _running_pair(shape=())[1]
    return dict(running_mean=rm, running_var=rv)


def _outcome(call, x, running_kind, kwargs):
    """(output or exception, running statistics after the call)."""
    running = _running(running_kind, x.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        try:
            result = call(x, **running, **kwargs)
        except Exception as e:  # noqa: BLE001  (the exception is what is compared)
            result = e
    return result, [t.clone() for t in running.values()]


def _assert_same(got, want):
    (y, stats), (y_want, stats_want) = got, want
    if isinstance(y_want, Exception):
        assert type(y) is type(y_want), (y, y_want)
        assert str(y) == str(y_want)
    else:
        assert not isinstance(y, Exception), y
        torch.testing.assert_close(y, y_want, **TOL)
    for s, s_want in zip(stats, stats_want, strict=True):
        torch.testing.assert_close(s, s_want, **TOL, equal_nan=True)


def _routed(x, **kwargs):
    with tin.enabled():
        return F.instance_norm(x, **kwargs)


@pytest.mark.parametrize("call", [tin.instance_norm, _routed], ids=["ours", "enabled"])
@pytest.mark.parametrize("name", list(CASES))
def test_functional_accepts_and_refuses_as_torch(name, call, launches):
    x, running_kind, kwargs = CASES[name]
    want = _outcome(TORCH_FN, x, running_kind, kwargs)
    got = _outcome(call, x, running_kind, kwargs)
    _assert_same(got, want)
    if not isinstance(want[0], Exception) and x.numel():
        assert launches("_fwd") == 1  # the kernels computed it


def _module_outcome(cls, x, kwargs, routed=False):
    module = cls(x.shape[1], **kwargs).to(DEVICE)
    with warnings.catch_warnings(), tin.enabled() if routed else contextlib.nullcontext():
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        try:
            result = module(x)
        except Exception as e:  # noqa: BLE001
            result = e
    return result, [t for t in (module.running_mean, module.running_var) if t is not None]


MODULE_CASES = {
    **{f"momentum {k}": dict(momentum=v, track_running_stats=True)
       for k, v in MOMENTUM.items()},
    **{f"eps {k}": dict(eps=v) for k, v in EPS.items()},
}


@pytest.mark.parametrize("routed", [False, True], ids=["ours", "enabled"])
@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_modules_accept_and_refuse_as_torch(name, routed, launches):
    """Module arguments reach the call as they are (torch's modules may hold a numpy or tensor
    momentum): our module, and torch's module under enabled()."""
    kwargs, x = MODULE_CASES[name], _x()
    want = _module_outcome(torch.nn.InstanceNorm2d, x, kwargs)
    got = _module_outcome(torch.nn.InstanceNorm2d if routed else tin.InstanceNorm2d, x, kwargs,
                          routed=routed)
    _assert_same(got, want)
    if not isinstance(want[0], Exception):
        assert launches("_fwd") == 1


def _eps_outcome(call, eps):
    """The exception type of ``call(eps)``, or None when it returns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        try:
            call(eps)
        except Exception as e:  # noqa: BLE001
            return type(e)
    return None


ADAPTIVE = {
    "adaptive_instance_norm": lambda eps: tin.adaptive_instance_norm(
        _x(), torch.ones(2, 3, device=DEVICE), torch.zeros(3, device=DEVICE), eps),
    "instance_stats": lambda eps: tin.instance_stats(_x(), eps),
    "adain": lambda eps: tin.adain(_x(), _x() * 2, eps),
    "AdaIN": lambda eps: tin.AdaIN(eps)(_x(), _x() * 2),
}


@pytest.mark.parametrize("name", list(EPS))
@pytest.mark.parametrize("function", list(ADAPTIVE))
def test_adaptive_eps_as_torch(function, name):
    """eps of the adaptive forms is taken as instance_norm's: torch's exception type for what it
    refuses."""
    want = _eps_outcome(lambda e: TORCH_FN(_x(), eps=e), EPS[name])
    assert want is not None
    assert _eps_outcome(ADAPTIVE[function], EPS[name]) is want


@pytest.mark.parametrize("function", list(ADAPTIVE))
def test_adaptive_eps_numpy_and_tensor(function):
    for eps in (np.float32(1e-3), torch.tensor(1e-3)):
        assert _eps_outcome(ADAPTIVE[function], eps) is None


def test_negative_slope_takes_floats_only():
    x = _x()
    want = F.leaky_relu(TORCH_FN(x), 0.25)
    for slope in (0.25, np.float32(0.25), torch.tensor(0.25)):
        torch.testing.assert_close(tin.instance_norm(x, activation="leaky_relu",
                                                     negative_slope=slope), want, **TOL)
    with pytest.raises(TypeError, match="negative_slope"):
        tin.instance_norm(x, activation="leaky_relu", negative_slope="0.25")
