"""convert_instance_norm(fuse_activation=True): what fuses (Sequentials, straight-line forwards,
the known library blocks, registered blocks, residual sums), with the same numbers as torch, on
models of the structure of the public reference networks, and the way back. test_fusion_safety.py:
nothing of the model runs or changes, and what stays unfused."""

import copy
import importlib.util
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from _networks import NETWORKS, BasicBlockD, ResidualBlock, ResnetBlock, eager_ops_after_norms
from utils import DEVICE, TOL

import triton_instnorm as tin
from triton_instnorm.fusion import FusedActivation, FusedResidual

nn = torch.nn
F64 = torch.float64
NORMS = (tin.InstanceNorm1d, tin.InstanceNorm2d, tin.InstanceNorm3d)
needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None, reason="needs monai")


def _outputs(model, x):
    """The output and the gradients of x and of every parameter, for a sum-of-squares loss."""
    x = x.detach().requires_grad_()
    y = model(x)
    return (y, *torch.autograd.grad(y.square().sum(), [x, *model.parameters()]))


def _check_equivalent(ref, fused, x, launches=None, expected_launches=None, tol=None):
    """Same output and gradients as the torch model; ``expected_launches`` forward launches."""
    before = launches("_fwd") if launches else 0
    got = _outputs(fused, x)
    if launches:
        assert launches("_fwd") - before == expected_launches
    for a, b in zip(got, _outputs(ref, x), strict=True):
        torch.testing.assert_close(a, b, **(tol or TOL[F64]))


def _fuse(ref):
    return tin.convert_instance_norm(copy.deepcopy(ref), fuse_activation=True)


def _activations(model):
    return {name: m.activation for name, m in model.named_modules() if type(m) in NORMS}


def _norm_count(model):
    return sum(type(m) in NORMS for m in model.modules())


# --- the reference networks -----------------------------------------------------------------------

# name -> eager ops left after a norm once fused: the four networks of the fusion issue lose every
# activation and sum; StarGAN v2's blocks call helper methods and MUNIT's branch: their forwards
# are unknown, only the generator's output Sequential fuses there.
COVERAGE = {"PlainConvUNet": (0, 0), "ResidualEncoderUNet": (0, 0), "TransformerNet": (0, 0),
            "ResnetGenerator": (0, 0), "PatchGAN": (0, 0), "StarGANv2": (4, 0), "MUNIT": (3, 2)}
UNFUSED = {"PlainConvUNet": (10, 0), "ResidualEncoderUNet": (9, 3), "TransformerNet": (10, 5),
           "ResnetGenerator": (7, 2), "PatchGAN": (3, 0), "StarGANv2": (5, 0), "MUNIT": (3, 2)}


@pytest.mark.parametrize("name", NETWORKS)
def test_coverage_on_reference_networks(name, launches):
    make, shape = NETWORKS[name]
    torch.manual_seed(0)
    ref = make().to(DEVICE, F64)
    x = torch.randn(shape, device=DEVICE, dtype=F64)
    fused = _fuse(ref)
    counts = eager_ops_after_norms(ref, x)
    assert (counts["activation"], counts["add"]) == UNFUSED[name]
    counts = eager_ops_after_norms(fused, x)
    assert (counts["activation"], counts["add"]) == COVERAGE[name]
    _check_equivalent(ref, fused, x, launches, _norm_count(fused))
    back = tin.revert_instance_norm(fused)
    assert [type(m) for m in back.modules()] == [type(m) for m in ref.modules()]
    _check_equivalent(ref, back, x, launches, 0)


def test_fusion_survives_copies_and_pickling(launches):
    make, shape = NETWORKS["TransformerNet"]
    torch.manual_seed(0)
    ref = make().to(DEVICE, F64)
    fused = _fuse(ref)
    assert isinstance(fused.res1, FusedResidual) and isinstance(fused.relu, FusedActivation)
    x = torch.randn(shape, device=DEVICE, dtype=F64)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for model in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)),
                  torch.load(buffer, weights_only=False)):
        assert type(model.res1) is type(fused.res1) and type(model.relu) is type(fused.relu)
        assert eager_ops_after_norms(model, x) == {"activation": 0, "add": 0}
        _check_equivalent(ref, model, x, launches, 15)
    assert tin.convert_instance_norm(fused, fuse_activation=True) is fused
    assert type(fused.res1) is type(copy.deepcopy(fused).res1)  # nothing more to do


# --- Sequentials ----------------------------------------------------------------------------------

ACTIVATIONS = [(nn.ReLU(), "relu", 0.01), (nn.LeakyReLU(0.2, inplace=True), "leaky_relu", 0.2),
               (nn.SiLU(), "silu", 0.01), (nn.GELU(), "gelu", 0.01)]


@pytest.mark.parametrize("act,name,slope", ACTIVATIONS)
@pytest.mark.parametrize("norm,conv,shape", [
    (nn.InstanceNorm1d, nn.Conv1d, (2, 3, 7)), (nn.InstanceNorm3d, nn.Conv3d, (2, 3, 3, 4, 2))])
def test_sequential_fusion(act, name, slope, norm, conv, shape, launches):
    torch.manual_seed(0)
    ref = nn.Sequential(conv(3, 4, 3, padding=1), norm(4, affine=True), act, conv(4, 2, 1),
                        norm(2), nn.GELU(approximate="tanh")).to(DEVICE, F64)
    keys = list(ref.state_dict())
    fused = _fuse(ref)
    assert fused[1].activation == name and fused[1].negative_slope == slope
    assert isinstance(fused[2], type(act)) and isinstance(fused[2], FusedActivation)
    assert fused[2]._fused_norms == [fused[1]]
    assert fused[4].activation is None and type(fused[5]) is nn.GELU  # tanh form: not fused
    assert list(fused.state_dict()) == keys
    _check_equivalent(ref, fused, torch.randn(shape, device=DEVICE, dtype=F64), launches, 2)
    back = tin.revert_instance_norm(fused)
    assert type(back[1]) is norm and type(back[2]) is type(act) and list(back.state_dict()) == keys
    assert "_fused_norms" not in vars(back[2])


def test_end_of_a_sequential_fuses_with_what_follows_it(launches):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3))
    ref = nn.Sequential(inner, nn.LeakyReLU(0.3)).to(DEVICE, F64)
    fused = _fuse(ref)
    assert fused[0][1].activation == "leaky_relu" and isinstance(fused[1], FusedActivation)
    _check_equivalent(ref, fused, torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64), launches, 1)


def test_sequential_parts_see_the_activated_output(launches):
    """Documented: a fused norm's own output is the activated one (slicing, iterating)."""
    torch.manual_seed(0)
    fused = _fuse(nn.Sequential(nn.InstanceNorm2d(3), nn.LeakyReLU(0.2)).to(DEVICE, F64))
    x = torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64)
    want = F.leaky_relu(F.instance_norm(x), 0.2)
    torch.testing.assert_close(fused[:1](x), want, **TOL[F64])
    torch.testing.assert_close(next(iter(fused))(x), want, **TOL[F64])
    assert launches("_fwd") == 2


# --- MONAI, registered blocks ---------------------------------------------------------------------

@needs_monai
@pytest.mark.parametrize("block,downsample", [("UnetBasicBlock", False), ("UnetResBlock", False),
                                              ("UnetResBlock", True)])
@pytest.mark.parametrize("training", [True, False])
def test_monai_blocks(block, downsample, training, launches):
    """UnetBasicBlock applies its one ``lrelu`` to norm1's and norm2's outputs: both fuse.
    UnetResBlock applies it to norm1's output and to the residual sum: norm1 fuses it, the sum
    moves into norm2 (into norm3, which makes the other term, when the block downsamples)."""
    from monai.networks import blocks

    torch.manual_seed(0)
    ref = getattr(blocks, block)(3, 2, 2 + downsample, kernel_size=3, stride=1,
                                 norm_name=("instance", {"affine": True}),
                                 act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.02}))
    ref = ref.to(DEVICE, F64).train(training)
    keys = list(ref.state_dict())
    fused = _fuse(ref)
    want = {"norm1": "leaky_relu", "norm2": "leaky_relu" if block == "UnetBasicBlock" else None}
    assert _activations(fused) == want | ({"norm3": None} if downsample else {})
    assert isinstance(fused.lrelu, FusedActivation) and list(fused.state_dict()) == keys
    assert isinstance(fused, FusedResidual) == (block == "UnetResBlock")
    x = torch.randn(2, 2, 4, 3, 3, device=DEVICE, dtype=F64)
    assert eager_ops_after_norms(fused, x) == {"activation": 0, "add": 0}
    _check_equivalent(ref, fused, x, launches, 2 + downsample)
    back = tin.revert_instance_norm(fused)
    assert list(back.state_dict()) == keys and type(back.norm1) is nn.InstanceNorm3d
    assert type(back.lrelu) is nn.LeakyReLU and type(back) is type(ref)


@needs_monai
def test_monai_dynunet_with_deep_supervision(launches):
    """Its top forward branches: it calls only its children, so the blocks below still fuse."""
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    ref = DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                  filters=[2, 3, 4], norm_name=("instance", {"affine": True}),
                  deep_supervision=True, deep_supr_num=1).to(DEVICE, F64)
    fused = _fuse(ref)
    assert len(_activations(fused)) == 10 and set(_activations(fused).values()) == {"leaky_relu"}
    _check_equivalent(ref.train(), fused.train(), torch.randn(1, 1, 8, 8, device=DEVICE,
                                                              dtype=F64), launches, 10)


class _TwoNorms(nn.Module):
    """A forward fusion cannot read (a keyword argument, a branch): only a registration says
    what it does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm1, self.norm2 = nn.InstanceNorm2d(3), nn.InstanceNorm2d(3, affine=True)
        self.act, self.scale = nn.SiLU(), 1.0

    def forward(self, x):
        h = self.act(self.norm1(self.conv(x)))
        if self.scale != 1.0:
            h = h * self.scale
        return self.act(self.norm2(F.pad(h, (1, 1), mode="constant")))


def test_registered_block(launches):
    torch.manual_seed(0)
    ref = _TwoNorms().to(DEVICE, F64)
    assert not any(_activations(_fuse(ref)).values())
    try:
        tin.register_block(_TwoNorms, [("norm1", "act"), ("norm2", "act")])
        fused = _fuse(ref)
        assert _activations(fused) == {"norm1": "silu", "norm2": "silu"}
        _check_equivalent(ref, fused, torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64),
                          launches, 2)

        class Sub(_TwoNorms):  # not the registered class
            pass

        assert not any(_activations(_fuse(Sub())).values())
    finally:
        from triton_instnorm import fusion
        fusion._REGISTERED.pop(_TwoNorms, None)
    with pytest.raises(TypeError, match="register_block takes"):
        tin.register_block(object, [("a", "b")])


# --- residual sums --------------------------------------------------------------------------------

RESIDUAL_BLOCKS = {  # name -> (block, input shape): every sum moves into a norm
    "BasicBlockD": (lambda: BasicBlockD(2, 2), (2, 2, 3, 4, 3)),
    "BasicBlockD-projection": (lambda: BasicBlockD(2, 3, stride=2), (2, 2, 4, 4, 4)),
    "fast-neural-style": (lambda: ResidualBlock(3), (2, 3, 5, 4)),
    "CycleGAN": (lambda: ResnetBlock(3), (2, 3, 5, 4)),
}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", RESIDUAL_BLOCKS)
def test_residual_blocks(name, dtype, launches):
    """Values and gradients of the fused block as the torch block's."""
    make, shape = RESIDUAL_BLOCKS[name]
    torch.manual_seed(0)
    ref = make().to(DEVICE, dtype)
    fused = _fuse(ref)
    assert isinstance(fused, FusedResidual) and type(fused).__name__ == type(ref).__name__
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    assert eager_ops_after_norms(fused, x) == {"activation": 0, "add": 0}
    _check_equivalent(ref, fused, x, launches, _norm_count(fused), tol=TOL[dtype])
    assert type(tin.revert_instance_norm(fused)) is type(ref)


@pytest.mark.parametrize("name", ["fast-neural-style", "CycleGAN"])
def test_residual_blocks_in_bfloat16(name):
    """The fused sum is rounded once, not twice: its error against float64 is the torch
    block's, give or take a rounding."""
    make, shape = RESIDUAL_BLOCKS[name]
    torch.manual_seed(0)
    exact = make().to(DEVICE, F64)
    x = torch.randn(shape, device=DEVICE, dtype=F64)
    for got, torch_got, want in zip(_outputs(_fuse(exact).bfloat16(), x.bfloat16()),
                                    _outputs(copy.deepcopy(exact).bfloat16(), x.bfloat16()),
                                    _outputs(exact, x), strict=True):
        error, torch_error = ((t.double() - want).abs().max() for t in (got, torch_got))
        assert error <= 1.5 * torch_error + 2e-2


def test_residual_block_falls_back_where_it_must(launches):
    """Checked at each call: a hook put on the norm later, a sum whose terms do not match
    (broadcast), a layer replaced by torch's: the block computes as written."""
    torch.manual_seed(0)
    ref = BasicBlockD(2, 2).to(DEVICE, F64)
    fused = _fuse(ref)
    x = torch.randn(2, 2, 3, 3, 3, device=DEVICE, dtype=F64)
    calls = []
    handle = fused.conv2.norm.register_forward_hook(lambda m, a, out: calls.append(out))
    _check_equivalent(ref, fused, x, launches, 2)
    assert len(calls) == 1 and eager_ops_after_norms(fused, x) == {"activation": 1, "add": 1}
    handle.remove()
    ref.skip = fused.skip = lambda t: t[:, :1]  # the sum broadcasts
    _check_equivalent(ref, fused, x)
    ref.skip = fused.skip = lambda t: t
    fused.conv2.norm = fused.conv2.all_modules[1] = copy.deepcopy(ref.conv2.norm)  # torch's
    _check_equivalent(ref, fused, x)
    assert eager_ops_after_norms(fused, x)["add"] == 1


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
    assert isinstance(fused[1], FusedActivation)  # checked before anything changed


def test_partial_revert_undoes_a_shared_fusion_whole(launches):
    """One activation module serves two blocks; reverting one block puts it back in both."""
    torch.manual_seed(0)
    act = nn.ReLU()
    ref = nn.Sequential(*(nn.Sequential(nn.InstanceNorm2d(3, affine=True), act)
                          for _ in range(2))).to(DEVICE, F64)
    model = _fuse(ref)
    assert list(_activations(model).values()) == ["relu", "relu"]
    tin.revert_instance_norm(model[0])
    assert type(model[0][0]) is nn.InstanceNorm2d and model[1][0].activation is None
    assert model[0][1] is model[1][1] and type(model[1][1]) is nn.ReLU
    _check_equivalent(ref, model, torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64), launches, 1)
