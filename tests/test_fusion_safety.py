"""convert_instance_norm(fuse_activation=True) leaves the user's forwards running as written, and
leaves unfused whatever could see the difference."""

import collections
import copy
import functools
import types

import pytest
import torch
import torch.nn.functional as F
from test_fusion import (
    F64,
    ConvDropoutNormReLU,
    TransformerNet,
    _activations,
    _check_equivalent,
    _fuse,
)
from utils import DEVICE

import triton_instnorm as tin
from triton_instnorm.fusion import FusedActivation

nn = torch.nn
DEVICE_TYPE = torch.device(DEVICE).type


# --- the user's forward keeps running as written --------------------------------------------------

class Block(nn.Module):
    """A straight-line custom forward that also reads its own parameter and buffer, keeps a plain
    tensor attribute, runs a frozen branch under no_grad and a float32 region, and stores a
    result on itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.act = nn.LeakyReLU(0.1)
        self.teacher = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 4, 1)
        self.gain = nn.Parameter(torch.randn(4, 1, 1))
        self.register_buffer("shift", torch.randn(4, 1, 1))
        self.temperature = torch.tensor(0.5)  # neither parameter nor buffer

    def forward(self, x):
        with torch.no_grad():
            target = self.teacher(x)
        h = self.act(self.norm(self.conv(x)))
        self.feature = h
        with torch.autocast(DEVICE_TYPE, enabled=False):  # in the parameters' dtype
            out = self.head(h.to(self.head.weight.dtype) * self.gain + self.shift)
        return out * self.temperature.to(out) - target


def _run_block_under_autocast():
    """A converted Block (its norm fused) and the torch one, run under bfloat16 autocast."""
    torch.manual_seed(0)
    ref = Block().to(DEVICE)
    fused = _fuse(ref)
    assert fused.norm.activation == "leaky_relu"
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
        return ref, fused, ref(x), fused(x)


def test_no_grad_region_holds():
    _, fused, _, out = _run_block_under_autocast()
    out.float().sum().backward()
    assert fused.teacher.weight.grad is None and fused.conv.weight.grad is not None


def test_autocast_disabled_region_holds():
    _, _, want, out = _run_block_under_autocast()
    assert out.dtype == want.dtype == torch.float32  # the float32 region ran in float32
    torch.testing.assert_close(out, want, atol=3e-2, rtol=3e-2)  # bfloat16 up to the region


def test_attribute_set_in_forward_is_the_tensor():
    ref, fused, _, _ = _run_block_under_autocast()
    assert type(fused.feature) is torch.Tensor  # the activated output of this call
    torch.testing.assert_close(fused.feature, ref.feature, atol=3e-2, rtol=3e-2)
    assert type(fused.act) is FusedActivation


def _reassign_shift(model):
    model.double().shift = torch.zeros(4, 1, 1, device=DEVICE, dtype=F64)


@pytest.mark.parametrize("built_on,change", [
    (DEVICE, lambda m: m.double()), ("cpu", lambda m: m.to(DEVICE, F64)),
    (DEVICE, _reassign_shift)], ids=["double", "to", "reassigned-buffer"])
def test_state_changes_after_conversion(built_on, change, launches):
    """The forward reads the module's current tensors, not those of conversion time."""
    torch.manual_seed(0)
    ref = Block().to(built_on)  # float32, then changed as the converted model is
    fused = _fuse(ref)
    change(ref), change(fused)
    state = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state), fused.load_state_dict(state)
    _check_equivalent(ref, fused, (2, 3, 5, 4), launches, 1)


def test_load_state_dict_assign_after_meta_init(launches):
    torch.manual_seed(0)
    ref = Block().to(DEVICE, F64)
    with torch.device("meta"):
        model = Block()
    model = tin.convert_instance_norm(model, fuse_activation=True)
    assert model.norm.activation == "leaky_relu"
    model.load_state_dict(ref.state_dict(), assign=True)
    model.temperature = ref.temperature
    _check_equivalent(ref, model, (2, 3, 5, 4), launches, 1)


def test_conversion_adds_no_attributes():
    ref = nn.Sequential(Block(), TransformerNet(), ConvDropoutNormReLU(2, 3))
    before = {name: sorted(vars(m)) for name, m in ref.named_modules()}
    fused = _fuse(ref)
    changed = {"0.norm", "0.act", "1.in1", "1.in2", "1.relu", "2.norm", "2.nonlin"}
    assert {name: sorted(vars(m)) for name, m in fused.named_modules() if name not in changed} == {
        name: keys for name, keys in before.items() if name not in changed}
    assert changed == {name for name, m in fused.named_modules() if type(m) in (
        tin.InstanceNorm2d, tin.InstanceNorm3d, FusedActivation)}


def test_hooks_and_replaced_children_still_run(launches):
    torch.manual_seed(0)
    ref = Block().to(DEVICE, F64)
    fused = _fuse(ref)
    calls = []
    fused.conv.register_forward_hook(lambda m, args, out: calls.append("conv"))
    fused.register_forward_pre_hook(lambda m, args: calls.append("block"))
    ref.head = nn.Conv2d(4, 4, 1).to(DEVICE, F64)
    fused.head = copy.deepcopy(ref.head)  # a child replaced after conversion is the one called
    fused.head.register_forward_hook(lambda m, args, out: calls.append("new head"))
    _check_equivalent(ref, fused, (2, 3, 5, 4), launches, 1)
    assert calls == ["block", "conv", "new head"]


# --- left unfused ---------------------------------------------------------------------------------

class _Case(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.InstanceNorm2d(3, affine=True), nn.ReLU()
        self.other = nn.Identity()
        self.flag = False


class _Straight(_Case):
    def forward(self, x):
        return self.act(self.norm(x))


class _FunctionalRelu(_Case):
    def forward(self, x):
        return F.relu(self.norm(x))


class _FunctionalLeaky(_Case):
    def forward(self, x):
        return F.leaky_relu(self.norm(x), 0.3)


class _ActivationUsedTwice(_Case):
    def forward(self, x):
        return self.act(self.norm(x)) + self.act(x)


class _OutputUsedTwice(_Case):
    def forward(self, x):
        y = self.norm(x)
        return self.act(y), y


class _OutputStored(_Case):
    def forward(self, x):
        self.pre = self.norm(x)
        return self.act(self.pre)


class _Bypass(_Case):
    def forward(self, x):
        return self.act.forward(self.norm(x))


class _BranchesOnTraining(_Case):
    def forward(self, x):
        y = self.norm(x)
        return self.act(y) if self.training else self.act(self.other(y))


class _BranchesOnFlag(_Case):
    def forward(self, x):
        y = self.norm(x)
        if self.flag:
            return self.other(y)
        return self.act(y)


class _Untraceable(_Case):
    def forward(self, x):
        return self.act(self.norm(x)) + torch.zeros(*x.shape, dtype=x.dtype, device=x.device)


class _ParentReachesIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.flag = _Straight(), False

    def forward(self, x):
        return self.block.act(x) if self.flag else self.block(x)


class _ParentIndexesSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq, self.flag = nn.Sequential(nn.InstanceNorm2d(3), nn.ReLU()), False

    def forward(self, x):
        return self.seq[1](x) if self.flag else self.seq(x)


class _LoopLooksIntoElement(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.InstanceNorm2d(3), nn.ReLU())])
        self.flag = False

    def forward(self, x):
        for block in self.blocks:
            x = block[1](x) if self.flag else block(x)
        return x


class _IteratesSequential(nn.Module):
    """Feature taps: the parent runs the Sequential's layers itself (and branches, so it is not
    traced); the Sequential's own chain must not fuse."""

    def __init__(self):
        super().__init__()
        self.seq, self.flag = nn.Sequential(nn.InstanceNorm2d(3, affine=True), nn.ReLU()), False

    def forward(self, x):
        taps = []
        for layer in self.seq:
            x = layer(x)
            taps.append(x)
        if self.flag:
            return x
        return tuple(taps)


class _ReadsModulesDict(_IteratesSequential):
    def forward(self, x):
        taps = []
        for layer in self.seq._modules.values():
            x = layer(x)
            taps.append(x)
        return tuple(taps)


class _ListsSequential(_IteratesSequential):
    norm_calls = 2

    def forward(self, x):
        layers = list(self.seq)
        return layers[0](x), self.seq(x)


def _pre_activation(block, x):
    if x.dim() == 3:  # an untraceable helper
        x = x.unsqueeze(0)
    return block.norm(x)


class _HandsBlockToFunction(nn.Module):
    norm_calls = 2

    def __init__(self):
        super().__init__()
        self.block = _Straight()

    def forward(self, x):
        return self.block(x) + _pre_activation(self.block, x)


class _PreActivationHead(nn.Module):
    def forward(self, block, x):
        return block.norm(x)


class _HandsBlockToModule(_HandsBlockToFunction):
    def __init__(self):
        super().__init__()
        self.head = _PreActivationHead()

    def forward(self, x):
        return self.block(x) + self.head(self.block, x)


class _StoredCallable(_HandsBlockToFunction):
    def __init__(self):
        super().__init__()
        self.pre_activation = functools.partial(_pre_activation, self.block)

    def forward(self, x):
        return self.block(x) + self.pre_activation(x)


class _ActivationUnderNoGrad(_Case):
    def forward(self, x):
        y = self.norm(x)
        with torch.no_grad():
            target = self.act(y)  # a target without gradient
        return x * target


class _PicksByIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers, self.depth = nn.ModuleList([nn.InstanceNorm2d(3), nn.ReLU()]), 2

    def forward(self, x):
        for i in range(self.depth):  # the depth may change between calls
            x = self.layers[i](x)
        return x


_FEATURES = []


class _StoresGlobally(_Case):
    def forward(self, x):
        y = self.norm(x)
        _FEATURES.append(y)
        return self.act(y)


class _PicksFromModulesDict(_Case):
    def __init__(self):
        super().__init__()
        self.mode = "act"

    def forward(self, x):
        return self._modules[self.mode](self.norm(x))  # the mode may change between calls


class _PicksFromPlainDict(_Case):
    def __init__(self):
        super().__init__()
        self.table, self.mode = {"act": self.act, "other": self.other}, "act"

    def forward(self, x):
        return self.table[self.mode](self.norm(x))


class _StoresInDeque(_Case):
    def __init__(self):
        super().__init__()
        self.recent = collections.deque(maxlen=2)

    def forward(self, x):
        y = self.norm(x)
        self.recent.append(y)
        return self.act(y)


class _Recorder:
    def __init__(self):
        self.buffers = {"features": []}

    def add(self, t):
        self.buffers["features"].append(t)


class _StoresInRecorder(_Case):
    def __init__(self):
        super().__init__()
        self.recorder = _Recorder()

    def forward(self, x):
        y = self.norm(x)
        self.recorder.add(y)
        return self.act(y)


def _without_grad(fn, t):
    with torch.no_grad():
        return fn(t)


class _HelperSwitchesGradMode(_Case):
    def forward(self, x):
        y = self.norm(x)
        return x * _without_grad(lambda t: self.act(t), y)


def _hooked():
    model = _Straight()
    model.act.register_forward_hook(lambda m, args, out: None)
    return model


def _instance_forward():
    model = _Straight()
    model.forward = types.MethodType(lambda self, x: self.act(self.norm(x)), model)
    return model


def _shared_norm():
    norm = nn.InstanceNorm2d(3)
    return nn.Sequential(nn.Sequential(norm, nn.ReLU()), norm)


UNFUSED = {
    "functional-relu": _FunctionalRelu, "functional-leaky-relu": _FunctionalLeaky,
    "activation-used-twice": _ActivationUsedTwice, "output-used-twice": _OutputUsedTwice,
    "output-stored": _OutputStored, "forward-bypasses-call": _Bypass,
    "branches-on-training": _BranchesOnTraining, "branches-on-flag": _BranchesOnFlag,
    "untraceable": _Untraceable, "parent-reaches-in": _ParentReachesIn,
    "parent-indexes-sequential": _ParentIndexesSequential,
    "loop-looks-into-element": _LoopLooksIntoElement,
    "hooked-activation": _hooked, "instance-forward": _instance_forward,
    "shared-norm": _shared_norm, "iterates-sequential": _IteratesSequential,
    "reads-modules-dict": _ReadsModulesDict, "lists-sequential": _ListsSequential,
    "hands-block-to-function": _HandsBlockToFunction,
    "hands-block-to-module": _HandsBlockToModule, "stored-callable": _StoredCallable,
    "activation-under-no-grad": _ActivationUnderNoGrad, "picks-by-index": _PicksByIndex,
    "stores-globally": _StoresGlobally, "picks-from-modules-dict": _PicksFromModulesDict,
    "picks-from-plain-dict": _PicksFromPlainDict, "stores-in-deque": _StoresInDeque,
    "stores-in-recorder": _StoresInRecorder, "helper-switches-grad-mode": _HelperSwitchesGradMode,
}


def test_straight_case_fuses(launches):
    """The control for the cases below: the same modules, a plain forward."""
    torch.manual_seed(0)
    ref = _Straight().to(DEVICE, F64)
    fused = _fuse(ref)
    assert fused.norm.activation == "relu" and type(fused.act) is FusedActivation
    _check_equivalent(ref, fused, (2, 3, 4, 5), launches, 1)


@pytest.mark.parametrize("case", UNFUSED)
def test_left_unfused(case, launches):
    torch.manual_seed(0)
    ref = UNFUSED[case]().to(DEVICE, F64)
    converted = _fuse(ref)
    assert _activations(converted) and not any(_activations(converted).values())
    assert not any(type(m) is FusedActivation for m in converted.modules())
    calls = ref.named_modules(remove_duplicate=False)  # a shared norm runs at each place
    norms = [m for _, m in calls if type(m) is nn.InstanceNorm2d]
    calls = getattr(ref, "norm_calls", len(norms))
    _check_equivalent(ref, converted, (2, 3, 4, 5), launches, calls)


_GLOBAL_QUEUE = collections.deque()


class _StoresInGlobalDeque(_Case):
    def forward(self, x):
        y = self.norm(x)
        _GLOBAL_QUEUE.append(y)
        return self.act(y)


def test_trace_leaves_no_proxy_in_globals():
    _FEATURES.clear(), _GLOBAL_QUEUE.clear()
    for model in (_StoresGlobally(), _StoresInGlobalDeque()):
        assert not any(_activations(_fuse(model)).values())
    assert _FEATURES == [] and not _GLOBAL_QUEUE


def test_constant_negative_index_still_fuses(launches):
    class LastBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([_Straight(), _Straight()])

        def forward(self, x):
            return self.blocks[-1](self.blocks[0](x))

    torch.manual_seed(0)
    ref = LastBlock().to(DEVICE, F64)
    fused = _fuse(ref)
    assert list(_activations(fused).values()) == ["relu", "relu"]
    _check_equivalent(ref, fused, (2, 3, 4, 5), launches, 2)


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
    _check_equivalent(ref, model, (2, 3, 4, 5), launches, 1)
