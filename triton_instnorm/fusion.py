"""Activation fusion on conversion: ``convert_instance_norm(model, fuse_activation=True)``.

A ReLU, LeakyReLU (negative_slope carried), SiLU or exact-erf GELU *module* applied to an instance
norm's output moves into our layer's ``activation=``: the forward kernel applies it, the backward
recomputes it, one launch and one activation-sized tensor fewer. The norm gets ``activation=``;
the activation module, wherever it is registered, is replaced by ``FusedActivation``, an
``nn.Identity`` that keeps the original for ``revert_instance_norm``. No forward is replaced:
every module's code runs as written (grad mode and autocast regions, attributes it sets, hooks on
other modules, ``load_state_dict(assign=True)``, ``.to()``). ``state_dict`` keys do not change.

What fusion changes: the fused norm's own output is the activated one; in float16 / bfloat16 the
activation runs before the output is rounded, so a fused LeakyReLU, SiLU or GELU differs from the
unfused pair by up to one rounding of the output (ReLU is exact). Iterating or indexing an
``nn.Sequential`` (``seq[:2](x)``), calling the norm or the activation module outside the model's
forwards, and forward hooks registered later on the norm see the activated tensor (or an
identity); ``named_modules`` shows a ``FusedActivation``.

When it fuses, from the calls the model's forwards make (``forward_calls.py`` says how they are
found, and which forwards are trusted): a norm fuses when each of its calls feeds its output, and
nothing else, to a one-argument call of an activation module, and that module is replaced only if
each of its calls takes a fused norm's output. One module may serve several norms (MONAI's
``UnetBasicBlock`` applies ``self.lrelu`` after ``norm1`` and ``norm2``), but nothing else
(``UnetResBlock`` applies it to the residual sum too: nothing fuses there). A module registered or
called at several places is fine: every call counts. Neither module may have hooks or its own
``__call__``/instance ``forward``, and no global module hook may exist.

Left unfused: functional activations (``F.relu(self.norm(x))``), a norm output used twice or
stored, a norm and an activation that run in different grad or autocast modes (``with
torch.no_grad()`` around one of them), and the norms and activations that a forward which does not
trace straight may call (it branches, picks modules by a value, fails to trace). A forward that
iterates a block (an ``nn.Sequential``), reads into it, or hands it to a function or another module
leaves that block's whole subtree unfused. Changes made to the model after conversion are not seen:
revert, change, convert again. Reverting part of a model undoes each fusion it holds whole, in the
rest of the model too (an activation module shared with norms elsewhere goes back to all its
places).
"""

from torch import nn
from torch.nn.modules import module as _module_globals

from . import activations
from .forward_calls import plain_call, survey
from .modules import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = ["FusedActivation", "fuse_activations", "fused_norms", "unfuse_activations"]

_NORMS = (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class FusedActivation(nn.Identity):
    """Stands where an activation module was; ``original`` is that module, ``norms`` the layers
    that now apply it and ``slots`` the (module, name) places it was registered at (none is
    registered as a child: ``state_dict`` and ``named_modules`` stay as before the fusion, less
    the activation)."""

    def __init__(self, original: nn.Module, norms) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "norms", tuple(norms))
        object.__setattr__(self, "slots", [])

    def extra_repr(self) -> str:
        return f"fused into the preceding norm: {self.original!r}"


def _module_activation(m):
    """(name, negative_slope) of a fusable activation module, else None."""
    return activations.of_module(m)


def _untouched(m):
    """A call of ``m`` is its class's forward alone: no hooks either."""
    return plain_call(m) and not any(getattr(m, name, None) for name in _HOOKS)


def _solve(calls, norms, activations):
    """The norms to fuse, each with its activation module, and the activation modules to replace.
    Starts from every candidate and drops those whose calls break a rule, until none does."""
    by_module, consumer = {}, {}
    for call in calls:
        by_module.setdefault(id(call.module), []).append(call)
        if call.source is not None:
            consumer[call.source] = call
    norms = {k for k in norms if k in by_module}
    activations = {k for k in activations if k in by_module}
    while True:
        chosen = {}
        for k in norms:
            users = [consumer.get(call) for call in by_module[k]]
            if all(u is not None and id(u.module) in activations for u in users):
                kinds = {_module_activation(u.module) for u in users}
                if len(kinds) == 1:
                    chosen[k] = kinds.pop()
        kept = {k for k in activations if all(
            call.source is not None and id(call.source.module) in chosen for call in by_module[k])}
        if chosen.keys() == norms and kept == activations:
            return chosen, kept, by_module
        norms, activations = set(chosen), kept


def fuse_activations(root: nn.Module) -> nn.Module:
    """Fuse activation modules into our layers throughout ``root`` (see the module docstring)."""
    if any(getattr(_module_globals, f"_global{name}", None) for name in _HOOKS):
        return root  # a global module hook sees every norm's output
    modules = {id(m): m for m in root.modules()}
    norms = {k for k, m in modules.items()
             if type(m) in _NORMS and m.activation is None and _untouched(m)}
    activations = {k for k, m in modules.items() if _module_activation(m) is not None
                   and _untouched(m) and not (m._parameters or m._buffers or m._modules)}
    if not norms or not activations:
        return root
    calls, blocked = survey(root, norms | activations)
    chosen, kept, by_module = _solve(calls, norms - blocked, activations - blocked)
    for k, activation in chosen.items():
        modules[k].activation, modules[k].negative_slope = activation
    replacement = {k: FusedActivation(modules[k], {
        id(call.source.module): call.source.module for call in by_module[k]}.values())
        for k in kept}
    for m in modules.values():
        for name, child in m._modules.items():
            if child is not None and id(child) in replacement:
                m._modules[name] = replacement[id(child)]
                replacement[id(child)].slots.append((m, name))
    return root


def fused_norms(root: nn.Module):
    """The layers whose activation a conversion fused, found from the places it rewrote."""
    found = {}
    for m in root.modules():
        if type(m) is FusedActivation:
            found.update((id(n), n) for n in m.norms)
    return list(found.values())


def unfuse_activations(root: nn.Module) -> nn.Module:
    """Undo ``fuse_activations``: activation modules back, norms plain. A fusion is undone whole:
    an activation module in ``root`` that also served norms elsewhere goes back to all its
    places, and those norms become plain too, inside ``root`` or not."""
    found = {id(child): child for m in root.modules() for child in m._modules.values()
             if type(child) is FusedActivation}
    for fused in found.values():
        for norm in fused.norms:
            norm.activation = None
        for m, name in fused.slots:
            if m._modules.get(name) is fused:
                m._modules[name] = fused.original
    return root
