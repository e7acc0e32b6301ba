"""convert_instance_norm(fuse_activation=True): what fuses (Sequential, nnU-Net, MONAI, one module
after several norms), with the same numbers as torch, and the way back. test_fusion_safety.py:
the user's forwards keep running as written, and what stays unfused."""

import copy
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE

import triton_instnorm as tin
from triton_instnorm.fusion import FusedActivation

nn = torch.nn
F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="needs monai")


def _check_equivalent(ref, fused, shape, launches, expected_launches):
    """Same outputs and gradients (input and every parameter) as the unfused model; the fused
    model makes ``expected_launches`` forward launches (one per norm: no separate activation)."""
    x = torch.randn(shape, device=DEVICE, dtype=F64, requires_grad=True)
    before = launches("_fwd")
    outputs = []
    for model in (ref, fused):
        y = model(x)
        y = torch.cat([t.flatten() for t in y]) if isinstance(y, tuple) else y
        outputs.append((y, *torch.autograd.grad(y.square().sum(), [x, *model.parameters()],
                                                allow_unused=True)))
    assert launches("_fwd") - before == expected_launches
    for got, want in zip(*reversed(outputs), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **TOL)


def _fuse(ref):
    return tin.convert_instance_norm(copy.deepcopy(ref), fuse_activation=True)


def _activations(model):
    return {name: m.activation for name, m in model.named_modules() if type(m) in (
        tin.InstanceNorm1d, tin.InstanceNorm2d, tin.InstanceNorm3d)}


def _no_instance_forward(model):
    return all("forward" not in m.__dict__ for m in model.modules())


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
    fused = _fuse(ref)
    assert fused[1].activation == name and fused[1].negative_slope == slope
    assert type(fused[2]) is FusedActivation and fused[2].norms == (fused[1],)
    assert fused[4].activation is None and type(fused[5]) is nn.GELU  # tanh form: not fused
    assert list(fused.state_dict()) == keys
    _check_equivalent(ref, fused, shape, launches, 2)
    back = tin.revert_instance_norm(fused)
    assert type(back[1]) is norm and type(back[2]) is type(act) and list(back.state_dict()) == keys
    _check_equivalent(ref, back, shape, launches, 0)


def test_sequential_parts_see_the_activated_output(launches):
    """Documented: the fused norm's own output is the activated one (slicing, iterating)."""
    torch.manual_seed(0)
    fused = _fuse(nn.Sequential(nn.InstanceNorm2d(3), nn.LeakyReLU(0.2)).to(DEVICE, F64))
    x = torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64)
    want = F.leaky_relu(F.instance_norm(x), 0.2)
    torch.testing.assert_close(fused[:1](x), want, **TOL)
    torch.testing.assert_close(next(iter(fused))(x), want, **TOL)
    assert launches("_fwd") == 2


# --- nnU-Net and MONAI ----------------------------------------------------------------------------

class ConvDropoutNormReLU(nn.Module):
    """nnU-Net's block as built there: norm and nonlin registered twice (attribute, Sequential)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True)
        self.all_modules = nn.Sequential(self.conv, self.norm, self.nonlin)

    def forward(self, x):
        return self.all_modules(x)


class Encoder(nn.Module):
    """nnU-Net's encoder: stages in a ModuleList, a forward that branches on a flag."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(ConvDropoutNormReLU(2, 4)),
                                     nn.Sequential(ConvDropoutNormReLU(4, 4))])
        self.return_skips = False

    def forward(self, x):
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips if self.return_skips else skips[-1]


class ResidualBlock(nn.Module):
    """nnU-Net's BasicBlockD: conv1 (norm + nonlin), conv2 (norm only), the skip, then nonlin."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvDropoutNormReLU(cin, cout)
        self.conv2, self.norm2 = nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout)
        self.skip = nn.Conv3d(cin, cout, 1)
        self.nonlin2 = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        out = self.norm2(self.conv2(self.conv1(x)))
        return self.nonlin2(out + self.skip(x))


def test_nnunet_blocks(launches):
    torch.manual_seed(0)
    ref = nn.Sequential(Encoder(), ResidualBlock(4, 3)).to(DEVICE, F64)
    keys = list(ref.state_dict())
    fused = _fuse(ref)
    assert _activations(fused) == {
        "0.stages.0.0.norm": "leaky_relu", "0.stages.1.0.norm": "leaky_relu",
        "1.conv1.norm": "leaky_relu", "1.norm2": None}
    block = fused[0].stages[0][0]
    assert type(block.nonlin) is FusedActivation and block.nonlin is block.all_modules[2]
    assert type(fused[1].nonlin2) is nn.LeakyReLU and list(fused.state_dict()) == keys
    _check_equivalent(ref, fused, (2, 2, 4, 3, 3), launches, 4)
    assert tin.convert_instance_norm(fused, fuse_activation=True) is fused  # nothing more to do
    _check_equivalent(ref, copy.deepcopy(fused), (1, 2, 3, 3, 3), launches, 4)
    buffer = io.BytesIO()
    torch.save(fused, buffer)  # whole-model pickling keeps the fusion
    buffer.seek(0)
    _check_equivalent(ref, torch.load(buffer, weights_only=False), (1, 2, 3, 3, 3), launches, 4)
    back = tin.revert_instance_norm(fused)
    assert list(back.state_dict()) == keys and _no_instance_forward(back)
    assert not any(type(m) in (tin.InstanceNorm3d, FusedActivation) for m in back.modules())
    assert back[0].stages[0][0].nonlin is back[0].stages[0][0].all_modules[2]
    _check_equivalent(ref, back, (2, 2, 4, 3, 3), launches, 0)


@needs_monai
@pytest.mark.parametrize("block", ["UnetBasicBlock", "UnetResBlock"])
@pytest.mark.parametrize("training", [True, False])
def test_monai_blocks(block, training, launches):
    """UnetBasicBlock applies its one ``lrelu`` to norm1's and norm2's outputs: both fuse.
    UnetResBlock applies it to the residual sum too: nothing fuses."""
    from monai.networks import blocks

    torch.manual_seed(0)
    ref = getattr(blocks, block)(3, 2, 4, kernel_size=3, stride=1,
                                 norm_name=("instance", {"affine": True}),
                                 act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.02}))
    ref = ref.to(DEVICE, F64).train(training)
    keys = list(ref.state_dict())
    fused = _fuse(ref)
    basic = block == "UnetBasicBlock"
    want = {"norm1": "leaky_relu", "norm2": "leaky_relu"} if basic else {
        "norm1": None, "norm2": None, "norm3": None}
    assert _activations(fused) == want and list(fused.state_dict()) == keys
    assert type(fused.lrelu) is (FusedActivation if basic else nn.LeakyReLU)
    if basic:
        assert fused.norm1.negative_slope == 0.02
        assert fused.lrelu.norms == (fused.norm1, fused.norm2)
    _check_equivalent(ref, fused, (2, 2, 4, 3, 3), launches, 2 if basic else 3)
    back = tin.revert_instance_norm(fused)
    assert list(back.state_dict()) == keys and type(back.norm1) is nn.InstanceNorm3d
    assert type(back.lrelu) is nn.LeakyReLU
    _check_equivalent(ref, back, (2, 2, 4, 3, 3), launches, 0)


@needs_monai
def test_monai_dynunet_with_deep_supervision(launches):
    """Its top forward branches (training and deep supervision) and does not trace in training
    mode: it calls only its children, so the blocks below still fuse."""
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    ref = DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                  filters=[2, 3, 4], norm_name=("instance", {"affine": True}),
                  deep_supervision=True, deep_supr_num=1).to(DEVICE, F64)
    fused = _fuse(ref)
    assert len(_activations(fused)) == 10 and set(_activations(fused).values()) == {"leaky_relu"}
    _check_equivalent(ref.train(), fused.train(), (1, 1, 8, 8), launches, 10)


class TransformerNet(nn.Module):
    """Fast neural style's network: one ReLU module after every instance norm."""

    def __init__(self):
        super().__init__()
        self.conv1, self.in1 = nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)
        self.conv2, self.in2 = nn.Conv2d(4, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)
        self.conv3 = nn.Conv2d(4, 3, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.in1(self.conv1(x)))
        y = self.relu(self.in2(self.conv2(y)))
        return self.conv3(y)


def test_one_activation_module_after_several_norms(launches):
    torch.manual_seed(0)
    ref = TransformerNet().to(DEVICE, F64)
    fused = _fuse(ref)
    assert _activations(fused) == {"in1": "relu", "in2": "relu"}
    assert type(fused.relu) is FusedActivation and fused.relu.norms == (fused.in1, fused.in2)
    _check_equivalent(ref, fused, (2, 3, 4, 5), launches, 2)
    assert type(tin.revert_instance_norm(fused).relu) is nn.ReLU


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
