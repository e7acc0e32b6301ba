"""Activation fusion on conversion: ``convert_instance_norm(model, fuse_activation=True)``.

A ReLU, LeakyReLU (its negative_slope carried), SiLU or GELU (exact erf form only) applied
directly to an instance norm's output moves into our layer's ``activation=``, where the forward
kernel applies it and the backward recomputes it: one launch and one activation-sized tensor
fewer per layer. Two places are rewritten:

- ``nn.Sequential`` (and subclasses that keep its forward): ``[..., norm, act, ...]`` becomes
  ``[..., norm(activation=...), FusedActivation, ...]``; ``FusedActivation`` is an
  ``nn.Identity`` that keeps the original module for ``revert_instance_norm``. Activation modules
  hold no parameters or buffers, so ``state_dict`` keys do not change.
- Any other module whose forward applies a norm child then an activation (a child module or
  ``F.relu`` / ``F.leaky_relu`` / ``F.silu`` / ``F.gelu`` / ``torch.relu``): its forward is
  traced with ``torch.fx`` (children as leaves), the activation call is removed from the traced
  graph and that graph becomes the instance's forward (the class's is untouched, and comes back
  on revert). An activation module called elsewhere too (MONAI's ``UnetResBlock`` applies
  ``self.lrelu`` after ``norm1`` and after the residual add) stays where it is still needed.
  The rewritten forward is a ``torch.fx.GraphModule``'s, holding the same child modules: it
  survives ``copy.deepcopy`` and pickling (``torch.save(model)``), but a child replaced on the
  module afterwards is not seen by it (revert first, replace, convert again).

Fused only when nothing else can see the difference: the norm's output feeds the activation
alone (a norm output also used by a residual branch is left alone), the norm is called once and
appears once in the model, neither module has hooks, and the forward traces the same in
training and eval mode with plain positional arguments (code branching on ``self.training`` or
on optional arguments would be frozen by tracing). ``inplace=True`` activations fuse like the
others: their input has no other user, so nobody observes the in-place write. A module that
cannot be traced is left unfused.
"""

import inspect

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from .modules import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = ["FusedActivation", "fuse_activations", "unfuse_activations", "fused_norms"]

_NORMS = (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)
_TORCH_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.silu: "silu",
              F.gelu: "gelu"}
_FUSED_FORWARD = "_triton_instnorm_fused_norms"  # instance attribute of a rewritten module


class FusedActivation(nn.Identity):
    """Stands where an activation was fused into the instance norm before it; ``original`` is that
    activation module and ``norm`` the layer that now applies it (neither is registered as a child:
    ``state_dict`` and ``named_modules`` stay as before the fusion, less the activation)."""

    def __init__(self, original: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "norm", norm)

    def extra_repr(self) -> str:
        return f"fused into the preceding norm: {self.original!r}"


def _module_activation(m):
    """(name, negative_slope) of a fusable activation module, else None."""
    if type(m) is nn.ReLU:
        return "relu", 0.01
    if type(m) is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    if type(m) is nn.SiLU:
        return "silu", 0.01
    if type(m) is nn.GELU and m.approximate == "none":
        return "gelu", 0.01
    return None


def _call_activation(node, modules):
    """(name, negative_slope) when ``node`` applies a fusable activation to its first argument."""
    if node.op == "call_module":
        m = modules[node.target]
        return None if _has_hooks(m) or len(node.args) != 1 or node.kwargs else _module_activation(m)
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    normalized = normalize_function(node.target, node.args, node.kwargs,
                                    normalize_to_only_use_kwargs=True)
    if normalized is None:
        return None
    # Whether in place or not, the result is the same: the norm's output has no other user.
    kwargs = {k: v for k, v in normalized.kwargs.items() if k not in ("input", "inplace")}
    slope = kwargs.pop("negative_slope", 0.01)
    if kwargs.pop("approximate", "none") != "none" or kwargs or not isinstance(slope, (int, float)):
        return None
    return _FUNCTIONS[node.target], float(slope)


def _has_hooks(m):
    return any(getattr(m, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _candidates(root):
    """Our layers with no activation, no hooks, appearing once in ``root``."""
    counts = {}
    for _, m in root.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return {id(m) for m in root.modules()
            if type(m) in _NORMS and m.activation is None and counts[id(m)] == 1 and not _has_hooks(m)}


def _fuse_into(norm, activation):
    norm.activation, norm.negative_slope = activation


def _fuse_sequential(seq, candidates):
    children = list(seq._modules.items())
    for (_, norm), (name, act) in zip(children, children[1:]):
        activation = _module_activation(act)
        if id(norm) in candidates and activation is not None and not _has_hooks(act):
            _fuse_into(norm, activation)
            candidates.discard(id(norm))
            seq._modules[name] = FusedActivation(act, norm)


class _ChildrenAsLeaves(fx.Tracer):
    """Traces a module's own forward only: every child (our norms included) is a leaf."""

    def is_leaf_module(self, m, qualified_name):
        return "." not in qualified_name or super().is_leaf_module(m, qualified_name)


def _trace(module):
    """``module``'s forward as a graph, or None where tracing could change its behaviour."""
    params = inspect.signature(type(module).forward).parameters.values()
    if "forward" in module.__dict__ or any(
            p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty
            for p in params):
        return None
    was_training = module.training
    try:
        graphs = []
        for training in (True, False):
            module.training = training  # this module's flag only: that is what its forward reads
            graphs.append(_ChildrenAsLeaves().trace(module))
        return graphs[0] if str(graphs[0]) == str(graphs[1]) else None
    except Exception:  # noqa: BLE001 - anything untraceable stays as it is
        return None
    finally:
        module.training = was_training


def _fuse_traced(module, candidates):
    if not any(id(child) in candidates for child in module.children()):
        return
    graph = _trace(module)
    if graph is None:
        return
    modules = dict(module.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = []
    for node in list(graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        if norm is None or id(norm) not in candidates or calls[node.target] != 1:
            continue
        if len(node.users) != 1:
            continue  # the norm's output is used elsewhere too (a residual branch, say)
        user = next(iter(node.users))
        activation = _call_activation(user, modules) if user.args[:1] == (node,) else None
        if activation is None:
            continue
        _fuse_into(norm, activation)
        candidates.discard(id(norm))
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        fused.append(norm)
    if fused:
        module.forward = fx.GraphModule(module, graph).forward
        object.__setattr__(module, _FUSED_FORWARD, fused)


def fuse_activations(root: nn.Module) -> nn.Module:
    """Fuse activations into our layers throughout ``root`` (see the module docstring)."""
    candidates = _candidates(root)
    for m in list(root.modules()):
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            _fuse_sequential(m, candidates)
    for m in list(root.modules()):
        if not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict) + _NORMS + _TORCH_NORMS):
            _fuse_traced(m, candidates)
    return root


def fused_norms(root: nn.Module):
    """The layers whose activation a conversion fused, found from the places it rewrote."""
    norms = []
    for m in root.modules():
        norms += getattr(m, _FUSED_FORWARD, [])
        norms += [child.norm for child in m.children() if type(child) is FusedActivation]
    return norms


def unfuse_activations(root: nn.Module) -> nn.Module:
    """Undo ``fuse_activations``: activation modules and class forwards back, norms plain."""
    for m in root.modules():
        if _FUSED_FORWARD in m.__dict__:
            for norm in m.__dict__.pop(_FUSED_FORWARD):
                norm.activation = None
            del m.forward
        for name, child in list(m._modules.items()):
            if type(child) is FusedActivation:
                child.norm.activation = None
                m._modules[name] = child.original
    return root
