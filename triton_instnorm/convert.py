"""Model conversion: swap ``torch.nn.InstanceNorm1d/2d/3d`` for ours, and back.

Modelled on ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: build the replacement, hand it the
old layer's state, and put it where the old one was. What carries over, and why:

- Everything in the old layer's ``__dict__``: the constructor arguments (num_features, eps,
  momentum including None, affine, track_running_stats, bias present or not), the ``training``
  flag, and whatever the user set on the layer (attributes, an instance-level ``forward``,
  ``qconfig``), so ``revert_instance_norm`` gives it all back.
- The SAME ``Parameter`` objects and buffer tensors, not copies: an optimizer built before the
  conversion keeps updating the live weights, and device and dtype carry over by construction.
- Every hook dict itself, forward, backward and state-dict hooks alike, so the
  ``RemovableHandle``s the user holds still remove them; load-state-dict hooks, which hold a weak
  reference to their layer, are re-bound to the new one.

Only the exact classes are swapped. Subclasses are left alone, because they may override
``forward``: in particular ``torch.nn.LazyInstanceNorm*`` that are still uninitialized (once
initialized they become plain ``torch.nn.InstanceNorm*`` and convert), and our own classes, which
makes the conversion idempotent. So are layers that carry an attribute named like one of ours
(``activation``, ``negative_slope``), and everything inside a TorchScript module (its children are
compiled with it). A module shared at several places in the model gets one replacement, shared
at the same places. Nothing else in the model is touched.
"""

import torch

from . import fusion
from .modules import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = ["convert_instance_norm", "revert_instance_norm"]

_TO_TRITON = {
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_TRITON.items()}

_OURS = ("activation", "negative_slope")  # what our layers add to torch's


def convert_instance_norm(module: torch.nn.Module,
                          fuse_activation: bool = False) -> torch.nn.Module:
    """Replace every ``torch.nn.InstanceNorm1d/2d/3d`` in ``module`` by ``triton_instnorm``'s.

    Works in place and returns ``module``; when ``module`` is itself such a layer, returns its
    replacement (as ``convert_sync_batchnorm`` does). Parameters and buffers are the same objects
    as before, so optimizers need not be rebuilt. The new layers have ``activation=None``, unless
    ``fuse_activation`` is true: then, where the structure the model declares shows it, a ReLU /
    LeakyReLU / SiLU / exact GELU module applied to a norm's output, and only to norms' outputs,
    moves into the layer's ``activation`` (the module becomes an identity), and a residual sum
    into its norm; no code of the model runs (see ``fusion.py``).

    Example::

        >>> model = triton_instnorm.convert_instance_norm(model, fuse_activation=True)
    """
    converted = _swap_tree(module, _TO_TRITON, {})
    return fusion.fuse(converted) if fuse_activation else converted


def revert_instance_norm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``triton_instnorm.InstanceNorm1d/2d/3d`` in ``module`` by torch's.

    The inverse of :func:`convert_instance_norm`, with the same rules (in place, same Parameter
    objects, the replacement returned for a layer passed on its own). Activation modules and
    residual blocks that ``fuse_activation=True`` fused get their own classes back, so the result
    computes what the model computed before the conversion, with its ``state_dict`` keys. Raises
    ``ValueError``, before changing anything, if any other layer has an ``activation`` (one built
    with ``activation=``, or a fused layer passed without the module that held its activation):
    torch's layer cannot express it.
    """
    restorable = {id(n) for m in module.modules() if isinstance(m, fusion.FusedActivation)
                  for n in m._fused_norms}  # (the norms a conversion fused)
    for name, m in module.named_modules():
        if type(m) in _TO_TORCH and m.activation is not None and id(m) not in restorable:
            where = f"'{name}'" if name else "the module passed"
            raise ValueError(
                f"cannot revert {where} ({type(m).__name__}, activation={m.activation!r}) to "
                f"torch.nn.{type(m).__name__}, which has no fused activation: set its activation "
                f"to None and apply the activation after it, or keep the Triton layer")
    return _swap_tree(fusion.unfuse(module), _TO_TORCH, {})


def _swap_tree(module, classes, memo):
    """``module`` with its subtree swapped; ``memo`` maps id(old) -> (old, new) so that a shared
    module is replaced once (``old`` is kept alive so that its id cannot be reused meanwhile)."""
    if id(module) in memo:
        return memo[id(module)][1]
    new_cls = classes.get(type(module))
    if new_cls is not None and (classes is _TO_TORCH or not any(
            name in module.__dict__ for name in _OURS)):
        output = _rebuild(module, new_cls)
    else:
        output = module
    memo[id(module)] = (module, output)
    if not isinstance(module, torch.jit.ScriptModule):
        for name, child in list(module._modules.items()):
            if child is not None:
                new_child = _swap_tree(child, classes, memo)
                if new_child is not child:
                    output._modules[name] = new_child  # (no __setattr__ of the parent runs)
    return output


def _rebuild(old, new_cls):
    """A ``new_cls`` layer holding ``old``'s arguments, tensors, flags, hooks and attributes."""
    # Built on the meta device: its own fresh tensors are thrown away just below, so this
    # allocates nothing (and, on a GPU, touches no device memory).
    new = new_cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
                  device="meta", bias=old.bias is not None or not old.affine)
    reverting = new_cls in _TO_TRITON  # to torch's class: without what ours adds
    state = {k: v for k, v in old.__dict__.items() if not (reverting and k in _OURS)}
    # The same Parameter and buffer objects, in the same order, including anything a user
    # registered on the layer beyond the standard ones (None entries as well), in dicts of its own.
    for name in ("_parameters", "_buffers", "_modules"):
        state[name] = state[name].copy()
    state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])
    new.__dict__.update(state)
    for name in ("_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        hooks = new.__dict__.get(name, {})
        for key, hook in hooks.items():
            if getattr(hook, "with_module", False):  # torch's wrapper: a weak reference
                hooks[key] = type(hook)(hook.hook, new)
    return new
