"""Modules: same constructor, parameters, buffers, state_dict, repr and behaviour as torch's."""

import copy
import io
import pickle

import pytest
import torch
from utils import DEVICE

import triton_instnorm as tin

CLASSES = [("InstanceNorm1d", (2, 4, 9)), ("InstanceNorm2d", (2, 4, 5, 3)),
           ("InstanceNorm3d", (2, 4, 3, 2, 3))]
CONFIGS = [dict(), dict(affine=True), dict(track_running_stats=True),
           dict(affine=True, track_running_stats=True, momentum=0.3, eps=1e-3),
           dict(affine=True, bias=False), dict(momentum=None, track_running_stats=True)]


def _pair(name, **kw):
    torch.manual_seed(0)
    ours = getattr(tin, name)(4, device=DEVICE, **kw)
    ref = getattr(torch.nn, name)(4, device=DEVICE, **kw)
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.copy_(torch.linspace(0.5, 1.5, 4))
            ref.weight.copy_(ours.weight)
            if ours.bias is not None:
                ours.bias.copy_(torch.linspace(-1, 1, 4))
                ref.bias.copy_(ours.bias)
    return ours, ref


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name,shape", CLASSES)
def test_same_structure_and_outputs(name, shape, cfg, launches):
    ours, ref = _pair(name, **cfg)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(ref, mode)()
        x = torch.randn(shape, device=DEVICE) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        # Without the batch dimension.
        torch.testing.assert_close(ours(x[0]), ref(x[0]), atol=1e-5, rtol=1e-5)
        for a, b in zip(ours.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert launches("_fwd") == 4


def test_state_dict_round_trip_with_torch():
    ref = torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True).to(DEVICE)
    ref(torch.randn(3, 4, 5, 5, device=DEVICE) + 2)
    with torch.no_grad():
        ref.weight.mul_(3)
    ours = tin.InstanceNorm2d(4, affine=True, track_running_stats=True).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True).to(DEVICE)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v) and torch.equal(back.state_dict()[k], v)
    # Old checkpoints without num_batches_tracked load, as into torch's module.
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    ours.load_state_dict(sd)


def test_unexpected_running_stats_error_matches_torch():
    sd = torch.nn.InstanceNorm2d(4, track_running_stats=True).state_dict()
    sd._metadata = {"": {}}  # pre-0.4 checkpoint: no version
    with pytest.raises(RuntimeError) as want:
        torch.nn.InstanceNorm2d(4).load_state_dict(sd)
    with pytest.raises(RuntimeError) as got:
        tin.InstanceNorm2d(4).load_state_dict(sd)
    assert str(got.value) == str(want.value)


def test_module_gradients_match():
    ours, ref = _pair("InstanceNorm2d", affine=True)
    x = torch.randn(2, 4, 6, 5, device=DEVICE, dtype=torch.float64)
    ours, ref = ours.double(), ref.double()
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    ours(xo).backward(dy)
    ref(xr).backward(dy)
    torch.testing.assert_close(xo.grad, xr.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def test_dtype_and_device_factory_kwargs():
    m = tin.InstanceNorm1d(3, affine=True, track_running_stats=True, dtype=torch.float64,
                           device=DEVICE)
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long
    y = m(torch.randn(2, 3, 7, dtype=torch.float64, device=DEVICE))
    assert y.dtype == torch.float64


def test_pickle_deepcopy_and_save():
    m = tin.InstanceNorm2d(4, affine=True, activation="leaky_relu", negative_slope=0.2)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is type(m) and clone.activation == "leaky_relu"
        assert clone.negative_slope == 0.2
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = tin.InstanceNorm2d(4, affine=True)
    m2.load_state_dict(torch.load(buf))


def test_repr_shows_activation():
    assert repr(tin.InstanceNorm2d(3, activation="relu")).endswith(
        "track_running_stats=False, activation='relu')")
    assert "negative_slope=0.1" in repr(tin.InstanceNorm3d(3, activation="leaky_relu",
                                                           negative_slope=0.1))


class _Tagged(torch.Tensor):
    """A tensor subclass that keeps torch's default ``__torch_function__`` (outputs come back as
    the subclass) and overrides ``new_empty`` with another signature, as MONAI's MetaTensor
    does."""

    def new_empty(self, size, dtype=None, device=None, requires_grad=False):
        assert isinstance(size, (tuple, list, torch.Size)), "size must be a sequence here"
        return self.as_subclass(torch.Tensor).new_empty(size, dtype=dtype, device=device)


@pytest.mark.parametrize("affine", [False, True])
def test_tensor_subclass_in_and_out_as_torch(affine, launches):
    """A subclass reaches the kernels and comes back as torch's layer returns it."""
    torch.manual_seed(0)
    ref = torch.nn.InstanceNorm2d(3, affine=affine, track_running_stats=True).to(DEVICE)
    ours = tin.convert_instance_norm(copy.deepcopy(ref))
    x = (torch.randn(2, 3, 5, 4, device=DEVICE) * 3 + 1).as_subclass(_Tagged)
    before = launches("_fwd")
    want, got = ref(x), ours(x)
    assert launches("_fwd") - before == 1
    assert type(got) is type(want) is _Tagged
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_monai_meta_tensor_keeps_its_metadata():
    monai_data = pytest.importorskip("monai.data")
    x = monai_data.MetaTensor(torch.randn(2, 3, 4, 4, device=DEVICE),
                              meta={"filename_or_obj": "case.nii"})
    ref = torch.nn.InstanceNorm2d(3, affine=True).to(DEVICE)
    got, want = tin.convert_instance_norm(copy.deepcopy(ref))(x), ref(x)
    assert type(got) is type(want) and got.meta["filename_or_obj"] == "case.nii"
    torch.testing.assert_close(got.as_tensor(), want.as_tensor())
