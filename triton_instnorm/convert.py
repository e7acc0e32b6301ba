"""Model conversion: swap ``torch.nn.InstanceNorm1d/2d/3d`` for ours, and back.

Modelled on ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: build the replacement, hand it the
old layer's state, and recurse into the children with ``add_module``. What carries over, and why:

- Constructor arguments (num_features, eps, momentum including None, affine,
  track_running_stats, bias present or not) and the ``training`` flag.
- The SAME ``Parameter`` objects and buffer tensors, not copies: an optimizer built before the
  conversion keeps updating the live weights, and device and dtype carry over by construction.
- Forward, forward-pre and backward hooks: the hook dicts themselves are handed over, so the
  ``RemovableHandle``s the user holds still remove them. State-dict hooks are NOT carried over
  (hooks registered ``with_module=True`` hold a weak reference to the old layer, which dies).

Only the exact classes are swapped. Subclasses are left alone, because they may override
``forward``: in particular ``torch.nn.LazyInstanceNorm*`` that are still uninitialized (once
initialized they become plain ``torch.nn.InstanceNorm*`` and convert), and our own classes, which
makes the conversion idempotent. A module shared at several places in the model gets one
replacement, shared at the same places.
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

# Per-module hook dicts that are handed over as they are (see the module docstring).
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
)


def convert_instance_norm(module: torch.nn.Module,
                          fuse_activation: bool = False) -> torch.nn.Module:
    """Replace every ``torch.nn.InstanceNorm1d/2d/3d`` in ``module`` by ``triton_instnorm``'s.

    Works in place and returns ``module``; when ``module`` is itself such a layer, returns its
    replacement (as ``convert_sync_batchnorm`` does). Parameters and buffers are the same objects
    as before, so optimizers need not be rebuilt. The new layers have ``activation=None``, unless
    ``fuse_activation`` is true: then a ReLU / LeakyReLU / SiLU / exact GELU module applied to a
    norm's output, and only to norms' outputs, moves into the layer's ``activation`` and its slot
    becomes an identity; forwards are not rewritten (see ``fusion.py``).

    Example::

        >>> model = triton_instnorm.convert_instance_norm(model, fuse_activation=True)
    """
    converted = _swap_tree(module, _TO_TRITON, {})
    return fusion.fuse_activations(converted) if fuse_activation else converted


def revert_instance_norm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``triton_instnorm.InstanceNorm1d/2d/3d`` in ``module`` by torch's.

    The inverse of :func:`convert_instance_norm`, with the same rules (in place, same Parameter
    objects, the replacement returned for a layer passed on its own). Activation modules that
    ``fuse_activation=True`` fused are put back where they were, so the result computes what the
    model computed before the conversion, with its ``state_dict`` keys. Raises ``ValueError``,
    before changing anything, if any other layer has an ``activation`` (one built with
    ``activation=``, or a fused layer passed without the module that held its activation):
    torch's layer cannot express it.
    """
    restorable = {id(m) for m in fusion.fused_norms(module)}
    for name, m in module.named_modules():
        if type(m) in _TO_TORCH and m.activation is not None and id(m) not in restorable:
            where = f"'{name}'" if name else "the module passed"
            raise ValueError(
                f"cannot revert {where} ({type(m).__name__}, activation={m.activation!r}) to "
                f"torch.nn.{type(m).__name__}, which has no fused activation: set its activation "
                f"to None and apply the activation after it, or keep the Triton layer")
    return _swap_tree(fusion.unfuse_activations(module), _TO_TORCH, {})


def _swap_tree(module, classes, memo):
    """``module`` with its subtree swapped; ``memo`` maps id(old) -> (old, new) so that a shared
    module is replaced once (``old`` is kept alive so that its id cannot be reused meanwhile)."""
    if id(module) in memo:
        return memo[id(module)][1]
    new_cls = classes.get(type(module))
    output = module if new_cls is None else _rebuild(module, new_cls)
    memo[id(module)] = (module, output)
    for name, child in list(module.named_children()):
        output.add_module(name, _swap_tree(child, classes, memo))
    return output


def _rebuild(old, new_cls):
    """A ``new_cls`` layer holding ``old``'s arguments, tensors, flags and hooks."""
    # Built on the meta device: its own fresh tensors are thrown away just below, so this
    # allocates nothing (and, on a GPU, touches no device memory).
    new = new_cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
                  device="meta", bias=old.bias is not None or not old.affine)
    # Whole-dict copies: the same Parameter and buffer objects, in the same order, including
    # anything a user registered on the layer beyond the standard ones (None entries as well).
    new._parameters = old._parameters.copy()
    new._buffers = old._buffers.copy()
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.training = old.training
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):  # some of these dicts do not exist in older PyTorch releases
            setattr(new, attr, getattr(old, attr))
    if hasattr(old, "qconfig"):  # quantization config, carried over as SyncBatchNorm does
        new.qconfig = old.qconfig
    return new
