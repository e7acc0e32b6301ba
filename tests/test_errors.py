"""Bad input raises what PyTorch raises: same exception type, same message."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE

import triton_instnorm as tin


def _t(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, dtype=dtype, device=DEVICE, **kw) if dtype.is_floating_point else \
        torch.randint(0, 3, shape, device=DEVICE).to(dtype)


X = (2, 3, 4, 5)
BAD_CALLS = {
    "1d input": lambda f: f(_t(5)),
    "2d input train": lambda f: f(_t(2, 5)),
    "one spatial element": lambda f: f(_t(2, 3, 1, 1)),
    "0d input": lambda f: f(torch.tensor(1.0, device=DEVICE)),
    "1d input eval": lambda f: f(_t(3), _t(3), _t(3).abs(), use_input_stats=False),
    "eval without stats": lambda f: f(_t(*X), use_input_stats=False),
    "running_mean only": lambda f: f(_t(*X), _t(3), None),
    "running_var only": lambda f: f(_t(*X), None, _t(3)),
    "int input": lambda f: f(_t(2, 3, 4, dtype=torch.int64)),
    "bool input": lambda f: f(_t(2, 3, 4, dtype=torch.bool)),
    "uint8 input": lambda f: f(_t(2, 3, 4, dtype=torch.uint8)),
    "weight wrong size": lambda f: f(_t(*X), weight=_t(4)),
    "bias wrong size": lambda f: f(_t(*X), bias=_t(4)),
    "weight 2d": lambda f: f(_t(*X), weight=_t(3, 1)),
    "running_mean wrong size": lambda f: f(_t(*X), _t(4), _t(4).abs()),
    "running_mean 2d": lambda f: f(_t(*X), _t(1, 3), _t(1, 3)),
    "momentum None": lambda f: f(_t(*X), _t(3), _t(3).abs(), momentum=None),
    "running_mean requires grad": lambda f: f(_t(*X), _t(3, requires_grad=True), _t(3).abs()),
    "running_var requires grad": lambda f: f(_t(*X), _t(3), _t(3).abs().requires_grad_()),
    "running stats expanded": lambda f: f(_t(*X), _t(1).expand(3), _t(1).abs().expand(3)),
    "running stats on meta": lambda f: f(_t(*X), torch.zeros(3, device="meta"),
                                         torch.ones(3, device="meta")),
    "input on meta": lambda f: f(_t(*X).to("meta"), weight=_t(3)),
    "float input half weight": lambda f: f(_t(*X), weight=_t(3, dtype=torch.float16)),
    "double input float weight": lambda f: f(_t(*X, dtype=torch.float64), weight=_t(3)),
    "half input bf16 weight": lambda f: f(_t(*X, dtype=torch.float16),
                                          weight=_t(3, dtype=torch.bfloat16)),
}


# Dtype errors whose text depends on the backend torch picks on CUDA (cuDNN's "Expected tensor for
# argument #1 'input' to have the same type ...", or its native kernel's "Expected weight to have
# type Float but got Half", or a different dispatch name for integer input): there we raise the
# same exception type with the CPU text. The accepted combinations are the same on both devices.
BACKEND_MESSAGES = {"int input", "bool input", "uint8 input", "float input half weight",
                    "double input float weight", "half input bf16 weight"}


def _same_message(got, want, device_dependent):
    if DEVICE == "cpu" or not device_dependent:
        assert str(got) == str(want)


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_same_error_as_torch(name):
    call = BAD_CALLS[name]
    with pytest.raises(Exception) as want:
        call(F.instance_norm)
    with pytest.raises(want.type) as got:
        call(tin.instance_norm)
    _same_message(got.value, want.value, name in BACKEND_MESSAGES)


@pytest.mark.parametrize("bad", ["tanh", "ReLU", 1])
def test_unknown_activation(bad):
    with pytest.raises(ValueError, match="relu"):
        tin.instance_norm(_t(*X), activation=bad)
    with pytest.raises(ValueError, match="leaky_relu"):
        tin.InstanceNorm2d(3, activation=bad)


@pytest.mark.parametrize("cls", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4, 5, 6])
def test_module_dim_errors(cls, ndim):
    ours, ref = getattr(tin, cls)(3), getattr(torch.nn, cls)(3)
    x = _t(*([2, 3, 4, 5, 6, 7][:ndim]))
    try:
        want = ref(x)
    except Exception as e:
        with pytest.raises(type(e)) as got:
            ours(x)
        assert str(got.value) == str(e)
    else:
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


def test_channel_mismatch_error_when_affine():
    with pytest.raises(ValueError) as want:
        torch.nn.InstanceNorm2d(3, affine=True).to(DEVICE)(_t(2, 4, 5, 5))
    with pytest.raises(ValueError) as got:
        tin.InstanceNorm2d(3, affine=True).to(DEVICE)(_t(2, 4, 5, 5))
    assert str(got.value) == str(want.value)


def test_channel_mismatch_warns_without_affine():
    x = _t(2, 4, 5, 5)
    with warnings.catch_warnings(record=True) as want:
        warnings.simplefilter("always")
        y_ref = torch.nn.InstanceNorm2d(3)(x)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        y = tin.InstanceNorm2d(3)(x)
    assert [str(w.message) for w in got] == [str(w.message) for w in want]
    assert [w.category for w in got] == [w.category for w in want] and len(got) == 1
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_no_crash_on_nan_eps():
    x = _t(2, 3, 6)
    y = tin.instance_norm(x, eps=float("nan"))
    assert y.shape == x.shape and torch.isnan(y).all()


_DT = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _same_outcome(call):
    """``call(F.instance_norm)`` and ``call(tin.instance_norm)``: the same RuntimeError (None), or
    both results, (torch's, ours)."""
    try:
        want = call(F.instance_norm)
    except RuntimeError as e:
        with pytest.raises(RuntimeError) as got:
            call(tin.instance_norm)
        _same_message(got.value, e, device_dependent=True)
        return None
    return want, call(tin.instance_norm)


@pytest.mark.parametrize("xd", _DT)
def test_parameter_dtype_rules_match_torch(xd):
    """Every (weight, bias) dtype combination: accepted or refused exactly as PyTorch does."""
    x = _t(2, 3, 4, dtype=xd)
    for wd in _DT + [None]:
        for bd in _DT + [None]:
            w = None if wd is None else torch.ones(3, dtype=wd, device=DEVICE)
            b = None if bd is None else torch.zeros(3, dtype=bd, device=DEVICE)
            results = _same_outcome(lambda f: f(x, weight=w, bias=b))
            if results:
                want, got = results
                assert got.dtype == want.dtype, (xd, wd, bd)


@pytest.mark.parametrize("xd", _DT)
def test_running_stat_dtype_rules_match_torch(xd):
    """Running statistics of every dtype pair, with no parameters, parameters in the input's dtype
    and float32 ones: accepted or refused as PyTorch does (running statistics in the parameters'
    dtype are read as they are; in another dtype, converted)."""
    x = _t(2, 3, 4, dtype=xd)
    for wd in dict.fromkeys([None, xd, torch.float32]):
        w = None if wd is None else torch.ones(3, dtype=wd, device=DEVICE)
        for md in _DT:
            for vd in _DT:
                def call(f, use_input_stats=(md == vd)):
                    mean = torch.zeros(3, dtype=md, device=DEVICE)
                    var = torch.ones(3, dtype=vd, device=DEVICE)
                    return f(x, mean, var, w, w, use_input_stats=use_input_stats), (mean, var)

                results = _same_outcome(call)
                if results:
                    (want, want_running), (got, got_running) = results
                    assert got.dtype == want.dtype, (xd, wd, md, vd)
                    torch.testing.assert_close(got_running, want_running, atol=1e-2, rtol=1e-2)


def test_running_var_expanded_updates_running_mean_then_raises():
    """torch writes running_mean, then fails on the expanded running_var: the same side effect."""
    x = _t(*X)
    means = [torch.zeros(3, device=DEVICE) for _ in range(2)]
    for f, mean in zip((F.instance_norm, tin.instance_norm), means):
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            f(x, mean, torch.ones(1, device=DEVICE).expand(3))
    assert means[0].abs().sum() > 0
    torch.testing.assert_close(means[1], means[0])
    # read only: evaluation with expanded statistics works
    running = torch.zeros(1, device=DEVICE).expand(3), torch.ones(1, device=DEVICE).expand(3)
    torch.testing.assert_close(tin.instance_norm(x, *running, use_input_stats=False),
                               F.instance_norm(x, *running, use_input_stats=False))


def test_complex_running_stats_as_torch():
    """torch takes the real part of complex running statistics, warns once, and writes them
    back."""
    x = _t(*X)
    running = [(torch.zeros(3, dtype=torch.complex64, device=DEVICE),
                torch.ones(3, dtype=torch.complex64, device=DEVICE)) for _ in range(2)]
    outs = []
    for f, (mean, var) in zip((F.instance_norm, tin.instance_norm), running):
        with warnings.catch_warnings():  # (torch warns once per process)
            warnings.simplefilter("ignore")
            outs.append(f(x, mean, var))
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(running[1], running[0])


ALL_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _torchs_name(dtype):
    """torch's own spelling of ``dtype``: the scalar type in its legacy type string
    (``torch.FloatTensor``, ``torch.quantized.QInt8Tensor``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental and deprecated dtypes
        return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_dtype_names_are_c10s(dtype):
    """Every dtype torch has is named as torch's messages name it: c10's names, 'UInt16',
    'Float8_e4m3fn', 'QUInt4x2'."""
    from triton_instnorm.arguments import dtype_name

    assert dtype_name(dtype) == _torchs_name(dtype)


REFUSED = [d for d in ALL_DTYPES if not (d.is_floating_point and d.itemsize > 1)]


@pytest.mark.parametrize("dtype", REFUSED, ids=str)
def test_refused_dtype_raises_torchs_error(dtype):
    """An input of a dtype instance norm refuses (float8 and 4-bit floats included) raises
    torch's error with torch's message (the CPU's; for quantized dtypes torch's text names its
    backends instead, and only the type is the same)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental and deprecated dtypes
        x = torch.empty(2, 3, 4, dtype=dtype)
    with pytest.raises(Exception) as want:
        F.instance_norm(x)
    with pytest.raises(want.type) as got:
        tin.instance_norm(x)
    if "Quantized" not in str(want.value):
        assert str(got.value) == str(want.value)
