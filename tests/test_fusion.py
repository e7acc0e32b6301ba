"""convert_instance_norm(fuse_activation=True): what fuses, what must not, and the way back."""

import copy
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import triton_instnorm as tin
from triton_instnorm.fusion import FusedActivation

nn = torch.nn
F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="needs monai")


def _check_equivalent(ref, fused, shape, launches, expected_launches):
    """Same outputs and gradients (input and every parameter) as the unfused model."""
    x = torch.randn(shape, device=DEVICE, dtype=F64, requires_grad=True)
    before = launches("_fwd")
    outputs = []
    for model in (ref, fused):
        y = model(x)
        outputs.append((y, *torch.autograd.grad(y.square().sum(), [x, *model.parameters()])))
    assert launches("_fwd") - before == expected_launches
    for got, want in zip(*reversed(outputs), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def _fuse(ref):
    ours = copy.deepcopy(ref)
    return ours, tin.convert_instance_norm(ours, fuse_activation=True)


ACTIVATIONS = [(nn.ReLU(), "relu", 0.01), (nn.LeakyReLU(0.2, inplace=True), "leaky_relu", 0.2),
               (nn.SiLU(), "silu", 0.01), (nn.GELU(), "gelu", 0.01)]


@pytest.mark.parametrize("act,name,slope", ACTIVATIONS)
@pytest.mark.parametrize("norm,conv,shape", [
    (nn.InstanceNorm1d, nn.Conv1d, (2, 3, 7)), (nn.InstanceNorm2d, nn.Conv2d, (2, 3, 5, 4)),
    (nn.InstanceNorm3d, nn.Conv3d, (2, 3, 3, 4, 2))])
def test_sequential_fusion(act, name, slope, norm, conv, shape, launches):
    torch.manual_seed(0)
    ref = nn.Sequential(conv(3, 4, 3, padding=1), norm(4, affine=True), act, conv(4, 2, 1),
                        norm(2), nn.GELU(approximate="tanh")).to(DEVICE, F64)
    keys = list(ref.state_dict())
    _, fused = _fuse(ref)
    assert fused[1].activation == name and fused[1].negative_slope == slope
    assert type(fused[2]) is FusedActivation and isinstance(fused[2], nn.Identity)
    assert fused[4].activation is None and type(fused[5]) is nn.GELU  # tanh form: not fused
    assert list(fused.state_dict()) == keys
    _check_equivalent(ref, fused, shape, launches, 2)
    back = tin.revert_instance_norm(fused)
    assert type(back[1]) is norm and type(back[2]) is type(act) and list(back.state_dict()) == keys
    _check_equivalent(ref, back, shape, launches, 0)


class ConvNormAct(nn.Module):
    """nnU-Net's ConvDropoutNormReLU: conv -> instance norm -> LeakyReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        return self.nonlin(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """nnU-Net's BasicBlockD: the second norm's output meets the skip before the activation."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True)
        self.conv2, self.norm2 = nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True)
        self.skip = nn.Conv3d(cin, cout, 1)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        out = self.nonlin(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.nonlin(out + self.skip(x))


def test_nnunet_blocks(launches):
    torch.manual_seed(0)
    ref = nn.Sequential(ConvNormAct(2, 4), ConvNormAct(4, 4), ResidualBlock(4, 3)).to(DEVICE, F64)
    keys = list(ref.state_dict())
    _, fused = _fuse(ref)
    assert [fused.get_submodule(p).activation for p in ("0.norm", "1.norm", "2.norm1", "2.norm2")] == [
        "leaky_relu", "leaky_relu", "leaky_relu", None]
    assert list(fused.state_dict()) == keys
    _check_equivalent(ref, fused, (2, 2, 4, 3, 3), launches, 4)
    assert tin.convert_instance_norm(fused, fuse_activation=True) is fused  # nothing more to do
    copied = copy.deepcopy(fused)  # the rewritten forwards follow the copy's own modules
    _check_equivalent(ref, copied, (1, 2, 3, 3, 3), launches, 4)
    buffer = io.BytesIO()
    torch.save(fused, buffer)  # whole-model pickling keeps the rewritten forwards
    buffer.seek(0)
    _check_equivalent(ref, torch.load(buffer, weights_only=False), (1, 2, 3, 3, 3), launches, 4)
    back = tin.revert_instance_norm(fused)
    assert "forward" not in back[0].__dict__ and list(back.state_dict()) == keys
    assert not any(type(m) in (tin.InstanceNorm3d, FusedActivation) for m in back.modules())
    _check_equivalent(ref, back, (2, 2, 4, 3, 3), launches, 0)


class _Functional(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.norm = nn.InstanceNorm2d(3, affine=True)
        self.activation = activation

    def forward(self, x):
        return self.activation(self.norm(x))


@pytest.mark.parametrize("activation,name,slope", [
    (lambda y: F.leaky_relu(y, 0.3), "leaky_relu", 0.3), (torch.relu, "relu", 0.01),
    (lambda y: F.gelu(y, approximate="none"), "gelu", 0.01), (F.silu, "silu", 0.01),
    (lambda y: F.gelu(y, approximate="tanh"), None, 0.01), (torch.tanh, None, 0.01)])
def test_functional_activations(activation, name, slope, launches):
    torch.manual_seed(0)
    ref = _Functional(activation).to(DEVICE, F64)
    _, fused = _fuse(ref)
    assert fused.norm.activation == name and fused.norm.negative_slope == slope
    _check_equivalent(ref, fused, (2, 3, 4, 5), launches, 1)


class _NormOutputUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.InstanceNorm2d(3), nn.ReLU()

    def forward(self, x):
        y = self.norm(x)
        return self.act(y) + y


class _BranchesOnTraining(_Functional):
    def forward(self, x):
        y = self.activation(self.norm(x))
        return y if self.training else y * 2


class _Untraceable(_Functional):
    def forward(self, x):
        y = self.activation(self.norm(x))
        return y if x.sum() > 0 else -y


def _hooked():
    model = nn.Sequential(nn.InstanceNorm2d(3), nn.ReLU())
    model[0].register_forward_hook(lambda m, args, out: None)
    return model


def _shared():
    norm = nn.InstanceNorm2d(3)
    return nn.Sequential(nn.Sequential(norm, nn.ReLU()), norm)


@pytest.mark.parametrize("make", [
    _NormOutputUsedTwice, lambda: _BranchesOnTraining(nn.ReLU()),
    lambda: _Untraceable(nn.ReLU()), _hooked, _shared], ids=[
    "output-used-twice", "branches-on-training", "untraceable", "hooked", "shared-norm"])
def test_left_unfused(make, launches):
    torch.manual_seed(0)
    ref = make().to(DEVICE, F64)
    _, converted = _fuse(ref)
    norms = [m for m in converted.modules() if isinstance(m, tin.InstanceNorm2d)]
    assert norms and all(m.activation is None for m in norms)
    assert not any(type(m) is FusedActivation for m in converted.modules())
    assert all("forward" not in m.__dict__ for m in converted.modules())
    _check_equivalent(ref, converted, (2, 3, 4, 5), launches, len(
        [n for _, n in ref.named_modules(remove_duplicate=False) if isinstance(n, nn.InstanceNorm2d)]))


def test_default_does_not_fuse_and_revert_rules():
    model = tin.convert_instance_norm(nn.Sequential(nn.InstanceNorm2d(3), nn.ReLU()))
    assert model[0].activation is None and type(model[1]) is nn.ReLU
    fused = tin.convert_instance_norm(nn.Sequential(nn.InstanceNorm2d(3), nn.ReLU()),
                                      fuse_activation=True)
    with pytest.raises(ValueError, match="the module passed"):
        tin.revert_instance_norm(fused[0])  # its activation lives in the parent: cannot restore
    built = nn.Sequential(fused, tin.InstanceNorm2d(3, activation="silu"))
    with pytest.raises(ValueError, match=r"'1'.*activation='silu'"):
        tin.revert_instance_norm(built)  # built with activation=: no torch equivalent
    assert type(fused[1]) is FusedActivation  # checked before anything changed


@needs_monai
@pytest.mark.parametrize("block", ["UnetBasicBlock", "UnetResBlock"])
@pytest.mark.parametrize("training", [True, False])
def test_monai_blocks(block, training, launches):
    from monai.networks import blocks

    torch.manual_seed(0)
    ref = getattr(blocks, block)(3, 2, 4, kernel_size=3, stride=1,
                                 norm_name=("instance", {"affine": True}),
                                 act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.02}))
    ref = ref.to(DEVICE, F64).train(training)
    keys = list(ref.state_dict())
    _, fused = _fuse(ref)
    fused_names = sorted(n for n, m in fused.named_modules() if getattr(m, "activation", None))
    # UnetResBlock's norm2 output meets the residual before self.lrelu: only norm1 fuses there.
    assert fused_names == (["norm1", "norm2"] if block == "UnetBasicBlock" else ["norm1"])
    assert fused.norm1.negative_slope == 0.02 and list(fused.state_dict()) == keys
    norms = 2 if block == "UnetBasicBlock" else 3
    _check_equivalent(ref, fused, (2, 2, 4, 3, 3), launches, norms)
    back = tin.revert_instance_norm(fused)
    assert list(back.state_dict()) == keys and type(back.norm1) is nn.InstanceNorm3d
    _check_equivalent(ref, back, (2, 2, 4, 3, 3), launches, 0)
