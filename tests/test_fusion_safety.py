"""convert_instance_norm(fuse_activation=True) runs no code of the model and changes nothing but
the norms, the fused activation modules and the residual blocks; what it cannot read stays
unfused."""

import copy
import linecache
import random
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fusion import F64, _activations, _check_equivalent, _fuse
from torch.utils.checkpoint import checkpoint
from utils import DEVICE

import triton_instnorm as tin
from triton_instnorm.fusion import FusedActivation, FusedResidual

nn = torch.nn


# --- no code of the model runs, nothing else changes ----------------------------------------------

MONITOR, LATEST = [], {}


class _Noisy(nn.Module):
    """A forward with side effects: random draws (torch, Python, numpy), a module-level list and
    dict written, a print, a call counter. Its Sequential fuses; its own pair, which it calls
    itself, does not (the forward cannot be read)."""

    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.InstanceNorm2d(3), nn.ReLU()
        self.seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3), nn.ReLU())
        self.calls = 0

    def forward(self, x):
        h = self.seq(self.act(self.norm(x)))
        keep = torch.rand(1).item() + random.random() + float(np.random.rand())
        MONITOR.append(h.std())
        LATEST["h"] = h.mean()
        print("forward")
        self.calls += 1
        return h * (keep > -1)


def _rng_states():
    return (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())


def test_conversion_runs_no_code_of_the_model(capsys, launches):
    torch.manual_seed(0)
    ref = _Noisy().to(DEVICE, F64)
    model = copy.deepcopy(ref)
    MONITOR.clear(), LATEST.clear()
    before = _rng_states()
    tin.convert_instance_norm(model, fuse_activation=True)
    after = _rng_states()
    changed = {"torch's random state": not torch.equal(before[0], after[0]),
               "Python's random state": before[1] != after[1],
               "numpy's random state": not np.array_equal(before[2], after[2]),
               "a module-level list": MONITOR != [], "a module-level dict": LATEST != {},
               "a counter": model.calls != 0, "the output": capsys.readouterr().out != ""}
    assert not any(changed.values()), changed
    assert model.seq[1].activation == "relu" and isinstance(model.seq[2], FusedActivation)
    assert model.norm.activation is None and type(model.act) is nn.ReLU
    torch.manual_seed(1)
    y = model(torch.randn(2, 3, 4, 4, device=DEVICE, dtype=F64))
    torch.manual_seed(1)
    torch.testing.assert_close(y, ref(torch.randn(2, 3, 4, 4, device=DEVICE, dtype=F64)))
    assert torch.stack(MONITOR).shape == (2,)  # real tensors, from the two calls
    assert launches("_fwd") == 2


def test_conversion_changes_nothing_else():
    from _networks import ResidualEncoderUNet, TransformerNet

    torch.manual_seed(0)
    model = nn.ModuleDict({"a": TransformerNet(), "b": ResidualEncoderUNet()})
    before = {id(m): (type(m), dict(vars(m)), dict(m._modules)) for m in model.modules()}
    tin.convert_instance_norm(model, fuse_activation=True)
    switched = 0
    for m in model.modules():
        if type(m) in (tin.InstanceNorm2d, tin.InstanceNorm3d):
            continue
        cls, attributes, children = before[id(m)]
        assert {k: v for k, v in vars(m).items() if k not in ("_modules", "_fused_norms")} == {
            k: v for k, v in attributes.items() if k != "_modules"}
        assert {k: c for k, c in m._modules.items() if type(c) not in (
            tin.InstanceNorm2d, tin.InstanceNorm3d)} == {
            k: c for k, c in children.items() if type(c) not in (nn.InstanceNorm2d,
                                                                   nn.InstanceNorm3d)}
        if type(m) is not cls:  # switched to a subclass of its class
            assert isinstance(m, (FusedActivation, FusedResidual)) and isinstance(m, cls)
            assert type(m)._fused_from is cls
            switched += 1
    # TransformerNet: 5 residual blocks, their 5 ReLUs and its own; ResidualEncoderUNet: 3
    # residual blocks, their 6 LeakyReLUs, the stem's and the decoder's 2
    assert switched == (5 + 5 + 1) + (3 + 6 + 1 + 2)


# --- what a converted model may hold --------------------------------------------------------------

class _ScriptableBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.InstanceNorm2d(3), nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(x))


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.InstanceNorm2d(3, affine=True), nn.SiLU())

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("kind", ["script", "trace", "fx", "checkpoint"])
def test_scripted_traced_fx_and_checkpointed_parts_convert(kind, launches):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64)
    part = _ScriptableBlock().to(DEVICE, F64)
    part = {"script": lambda: torch.jit.script(part), "trace": lambda: torch.jit.trace(part, x),
            "fx": lambda: torch.fx.symbolic_trace(part), "checkpoint": _Checkpointed}[kind]()
    ref = nn.Sequential(part.to(DEVICE, F64), _ScriptableBlock().to(DEVICE, F64))
    fused = _fuse(ref)
    assert fused[1].norm.activation == "relu"  # the plain block beside it fuses
    if kind in ("script", "trace"):  # compiled: left whole
        assert isinstance(fused[0], torch.jit.ScriptModule)
    else:  # converted; fx's generated forward is not read, the checkpointed Sequential is
        norm = fused[0].block[0] if kind == "checkpoint" else fused[0].norm
        assert type(norm) is tin.InstanceNorm2d and (kind == "checkpoint") == (
            norm.activation == "silu")
    # (a checkpointed forward runs again in the backward)
    _check_equivalent(ref, fused, x, launches, {"script": 1, "trace": 1, "fx": 2}.get(kind, 3))


# --- what stays unfused ---------------------------------------------------------------------------

class _Case(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.InstanceNorm2d(3, affine=True), nn.ReLU()
        self.other, self.flag = nn.Identity(), False


class _Straight(_Case):
    def forward(self, x):
        return self.act(self.norm(x))


class _FunctionalRelu(_Case):
    def forward(self, x):
        return F.relu(self.norm(x))


class _OutputUsedTwice(_Case):
    def forward(self, x):
        y = self.norm(x)
        return self.act(y) + y


class _ActivationAlsoElsewhere(_Case):
    def forward(self, x):
        return self.act(self.norm(x)) + self.act(self.other(x))


class _OutputStored(_Case):
    def forward(self, x):
        self.pre = self.norm(x)
        return self.act(self.pre)


class _Branches(_Case):
    def forward(self, x):
        y = self.norm(x)
        if self.flag:
            return self.other(y)
        return self.act(y)


class _UnderNoGrad(_Case):
    def forward(self, x):
        y = self.norm(x)
        with torch.no_grad():
            target = self.act(y)
        return self.other(y) * target


class _CallsForward(_Case):
    def forward(self, x):
        return self.act.forward(self.norm(x))


class _Shadowed(_Straight):
    @property
    def act(self):  # ``self.act`` is not the child
        return self._modules["act"]


def _hooked():
    model = _Straight()
    model.act.register_forward_hook(lambda m, args, out: None)
    return model


def _instance_forward():
    model = _Straight()
    model.norm.forward = types.MethodType(lambda self, x: x, model.norm)
    return model


def _norm_also_unknown():
    """The norm is also a child of a module whose forward is unknown."""
    outer = _Branches()
    outer.inner = nn.Sequential(outer.norm, nn.ReLU())
    return outer


UNFUSED = {
    "functional-relu": _FunctionalRelu, "output-used-twice": _OutputUsedTwice,
    "activation-also-elsewhere": _ActivationAlsoElsewhere, "output-stored": _OutputStored,
    "branches": _Branches, "under-no-grad": _UnderNoGrad, "calls-forward": _CallsForward,
    "shadowed": _Shadowed, "hooked-activation": _hooked, "instance-forward": _instance_forward,
    "norm-also-in-unknown-forward": _norm_also_unknown,
}


def test_straight_case_fuses(launches):
    """The control for the cases below: the same modules, a forward that reads."""
    torch.manual_seed(0)
    ref = _Straight().to(DEVICE, F64)
    fused = _fuse(ref)
    assert fused.norm.activation == "relu" and isinstance(fused.act, FusedActivation)
    _check_equivalent(ref, fused, torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64), launches, 1)


@pytest.mark.parametrize("case", UNFUSED)
def test_left_unfused(case):
    torch.manual_seed(0)
    ref = UNFUSED[case]().to(DEVICE, F64)
    converted = _fuse(ref)
    assert _activations(converted) and not any(_activations(converted).values())
    assert not any(isinstance(m, FusedActivation) for m in converted.modules())
    x = torch.randn(2, 3, 4, 5, device=DEVICE, dtype=F64)
    if case != "instance-forward":
        _check_equivalent(ref, converted, x)


def test_stale_source_is_not_read(tmp_path, monkeypatch):
    """A forward whose file changed since it was imported: the file no longer tells what runs."""
    path = tmp_path / "stale_block.py"
    path.write_text("import torch\n\nclass Block(torch.nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.norm = torch.nn.InstanceNorm2d(3)\n"
                    "        self.act = torch.nn.ReLU()\n\n    def forward(self, x):\n"
                    "        return self.act(x) + self.norm(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import stale_block

    source = path.read_text()
    path.write_text(source.replace("self.act(x) + self.norm(x)", "self.act(self.norm(x))"))
    linecache.clearcache()
    assert not any(_activations(_fuse(stale_block.Block())).values())


def test_changes_after_conversion_raise_rather_than_compute_wrong():
    from _networks import BasicBlockD

    block = _fuse(BasicBlockD(2, 2))
    assert isinstance(block.nonlin2, FusedActivation)  # fused through the block's sum
    block.apply_se = 1  # the known program reads booleans only
    with pytest.raises(RuntimeError, match="changed since its sums were fused"):
        block(torch.randn(1, 2, 3, 3, 3))


def test_global_hook_blocks_fusion():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: None)
    try:
        assert not any(_activations(_fuse(_Straight())).values())
    finally:
        handle.remove()


