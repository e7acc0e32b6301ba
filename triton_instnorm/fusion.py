"""Fusion on conversion (``convert_instance_norm(model, fuse_activation=True)``), decided from the
programs of forward_programs.py: no code of the model runs, and nothing but the norms, the fused
activation modules and the residual blocks changes (the README says what fuses).

Norms take their activation as ``activation=``; the activation modules become ``FusedActivation``
(an identity) and residual blocks ``FusedResidual`` (their program run with the sums moved into
norms, checked again at each call): subclasses of their own classes, switched back by ``unfuse``.
"""

import collections
import functools
import inspect
import operator

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from . import activations
from .forward_programs import ADDS, HOOKS, child, free, program
from .modules import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = ["FusedActivation", "FusedResidual", "fuse", "fused_norms", "unfuse"]

_NORMS = (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)
_UNKNOWN = "unknown"  # what code no program shows does with an output, or passes as an input


def _global_hooks():
    return any(getattr(_module_globals, f"_global{name}", None) for name in HOOKS)


@functools.lru_cache(maxsize=512)
def _uses(prog):
    """For each value of ``prog``, the steps that take it (``"ret"``: the forward returns it)."""
    return [[i for i, (_, args) in enumerate(prog.steps) for a in args if a == v]
            + ["ret"] * (v == prog.ret) for v in range(len(prog.steps) + 1)]


@functools.lru_cache(maxsize=512)
def _dropped(prog):
    """For each step of ``prog``, the values no later step takes nor the forward returns (freed
    as a forward that rebinds its names frees them)."""
    uses = _uses(prog)
    return [[v for v in set(args) if "ret" not in uses[v] and max(uses[v]) == i]
            for i, (_, args) in enumerate(prog.steps)]


def _tail(m):
    """[m, ..., t], t's output m's, each module's the next one's (the last step of a free
    module's closed program); None for no module."""
    chain = [m] if m is not None else None
    while chain and type(m) not in _NORMS and free(m):
        prog = program(m)
        if not (prog and prog.closed and prog.ret == len(prog.steps) > 0):
            break
        m = prog.steps[-1][0] not in ADDS and child(m, prog.steps[-1][0])
        chain = chain + [m] if m else None
    return chain


def _site(block, prog, k):
    """(the call step the sum at step k moves into, its other term, the chain to that norm), or
    None."""
    uses, (a, b) = _uses(prog), prog.steps[k][1]

    def norm(v):  # the chain to our norm whose output is value v, taken by the sum only
        chain = _tail(child(block, prog.steps[v - 1][0])) if v and uses[v] == [k] else None
        end = chain and chain[-1]
        return chain if type(end) in _NORMS and free(end) and end.activation is None else None

    for v, other in ((a, b), (b, a)):
        chain = other < v and norm(v)
        if chain and (v == a or prog.steps[k][0] == "+" or norm(a)):
            return v - 1, other, chain
    return None


def fuse(root: nn.Module) -> nn.Module:
    """Fuses activations and residual sums throughout ``root`` (see the module docstring)."""
    if _global_hooks():
        return root  # a global hook sees every norm's output
    modules, progs, stack = {}, {}, [root]
    calls = collections.defaultdict(list)  # id(module) -> [(block, step)]; step None: unknown
    calls[id(root)].append((None, None))
    while stack:
        m = stack.pop()
        if id(m) in modules or isinstance(m, torch.jit.ScriptModule):  # (compiled: left whole)
            continue
        modules[id(m)] = m
        prog = progs[id(m)] = program(m)
        for i, (op, _) in enumerate(prog.steps if prog else ()):
            if child(m, op) is not None:
                calls[id(child(m, op))].append((m, i))
        for c in filter(None, m._modules.values()):
            if not (prog and (prog.closed or any(b is m for b, _ in calls[id(c)]))):
                calls[id(c)].append((m, None))  # a forward that may call it in any way
            stack.append(c)
    sites = {(id(m), k) for m in modules.values() if progs[id(m)] and progs[id(m)].closed
             for k, (op, _) in enumerate(progs[id(m)].steps)
             if op in ADDS and _site(m, progs[id(m)], k)}

    def flow(m, out, seen=()):
        """Where m's output goes (``out``), or what its input is the output of, at each call:
        module ids, sums (block id, step), _UNKNOWN."""
        found = set()
        for block, i in calls[id(m)]:
            if i is None or id(m) in seen:
                found.add(_UNKNOWN)
                continue
            prog = progs[id(block)]
            v = i + 1 if out else prog.steps[i][1][0]
            uses = _uses(prog)[v]
            end = (uses[0] if out else v - 1) if len(uses) == 1 else None  # the other end
            if end in ("ret", -1):  # the block's own output, or input
                closed = free(block) and prog.closed
                found |= flow(block, out, seen + (id(m),)) if closed else {_UNKNOWN}
            elif end is not None and prog.steps[end][0] in ADDS:
                found.add((id(block), end))
            else:
                other = end is not None and child(block, prog.steps[end][0])
                chain = other and ([other] if out else _tail(other))
                found.add(id(chain[-1]) if chain else _UNKNOWN)
        return found

    norms = {k: flow(m, True) for k, m in modules.items()
             if type(m) in _NORMS and m.activation is None and free(m)}
    acts = {k: (_kind(m), flow(m, False)) for k, m in modules.items() if _kind(m) and free(m)
            and not (isinstance(m, _Switched) or m._parameters or m._buffers or m._modules)}
    while True:  # drop the candidates whose partners are not candidates, until none is dropped
        chosen = {}
        for k, targets in norms.items():
            kinds = {acts[t][0] if t in acts else None for t in targets}
            if targets and None not in kinds and len(kinds) == 1:
                chosen[k] = kinds.pop()
        kept = {a: (kind, sources) for a, (kind, sources) in acts.items()
                if sources and all(chosen.get(s) == kind or s in sites for s in sources)}
        if chosen.keys() == norms.keys() and kept.keys() == acts.keys():
            break
        norms, acts = {k: norms[k] for k in chosen}, kept
    for k, (activation, slope) in chosen.items():
        modules[k].activation, modules[k].negative_slope = activation, slope
    for a, (_, sources) in acts.items():  # (object's setattr: no __setattr__ of theirs runs)
        object.__setattr__(modules[a], "_fused_norms", [modules[s] for s in sources if s in chosen])
        object.__setattr__(modules[a], "__class__", _switched(type(modules[a]), FusedActivation))
    for k in {k for k, _ in sites}:
        cls = vars(type(modules[k])).get("_fused_from", type(modules[k]))
        object.__setattr__(modules[k], "__class__", _switched(cls, FusedResidual))
    return root


def _kind(m):
    """(activation, negative_slope) of a fusable activation module (a fused one's by the class it
    was switched from), else None."""
    return activations.of_module(m, vars(type(m)).get("_fused_from", type(m)))


# --- residual blocks ------------------------------------------------------------------------------

class _Switched:
    """What fusion switches a module's class to: a subclass of its class (``_fused_from``) that
    pickles and copies as itself, rebuilt from the original class."""

    def __reduce_ex__(self, protocol):
        return (_switched_instance, (type(self)._fused_from, type(self).__bases__[0]),
                *super().__reduce_ex__(protocol)[2:])


class FusedActivation(_Switched):
    """A fused activation module: an identity (its norms, ``_fused_norms``, apply it)."""

    def forward(self, input):
        return input

    def extra_repr(self) -> str:
        return ", ".join(filter(None, (super().extra_repr(), "fused into the preceding norm")))


class FusedResidual(_Switched):
    """A residual block whose sums move into norms (see ``fuse``)."""

    def forward(self, *args, **kwargs):
        original, prog = type(self)._fused_from.forward, program(self)
        bound = (self, *args) if len(args) == 1 and not kwargs else tuple(inspect.signature(
            original).bind(self, *args, **kwargs).arguments.values())
        if prog is None or len(bound) != 2:  # a FusedActivation may need the program
            if any(isinstance(c, FusedActivation) for c in self._modules.values()):
                raise RuntimeError(f"{type(self).__name__} changed since its sums were fused: "
                                   "revert_instance_norm, change it, convert again")
            return original(self, *args, **kwargs)
        sites = {} if _global_hooks() else {site[0]: (k, *site[1:]) for k, (op, _) in enumerate(
            prog.steps) if op in ADDS and (site := _site(self, prog, k))}
        return _execute(self, prog, bound[1], sites)[prog.ret]


@functools.lru_cache(maxsize=None)
def _switched(cls, mixin):
    return type(cls.__name__, (mixin, cls), dict(
        _fused_from=cls, __module__=cls.__module__, __qualname__=cls.__qualname__))


def _switched_instance(cls, mixin):
    return object.__new__(_switched(cls, mixin))


def _execute(block, prog, x, sites, steps=None):
    """The values of ``prog`` (its first ``steps``) run on ``x``; ``sites``: {call step: (sum
    step, other term, chain)} of the sums that move into norms when their terms allow."""
    values, summed, dropped = [x], {}, _dropped(prog)
    for i, (op, args) in enumerate(prog.steps[:steps]):
        if i in sites:  # the call whose output the sum takes
            k, other, chain = sites[i]
            value, summed[k] = _norm_sum(chain, values[args[0]], values[other],
                                         _fused_activation(block, prog, k + 1))
        elif summed.get(i) is not None:  # that sum, made by the norm
            value = summed[i]
        elif op in ADDS:
            value = (operator.add if op == "+" else operator.iadd)(*(values[v] for v in args))
            act = _fused_activation(block, prog, i + 1)  # fused for a sum that did not move
            value = value if act is None else type(act)._fused_from.forward(act, value)
        else:
            value = getattr(block, op)(values[args[0]])
        values.append(value)
        for v in dropped[i]:
            values[v] = None
    return values


def _fused_activation(block, prog, v):
    """The FusedActivation whose call alone takes value ``v``, else None."""
    uses = _uses(prog)[v]
    act = child(block, prog.steps[uses[0]][0]) if len(uses) == 1 and uses != ["ret"] else None
    return act if isinstance(act, FusedActivation) else None


def _norm_sum(chain, x, residual, act):
    """(the chain's output on ``x``, its sum with ``residual`` through ``act``'s original when
    the norm can take the residual, else None)."""
    for wrapper in chain[:-1]:
        prog = program(wrapper)
        x = _execute(wrapper, prog, x, {}, -1)[prog.steps[-1][1][0]]
    if not all(isinstance(t, torch.Tensor) for t in (x, residual)) or (
            type(residual), residual.shape, residual.dtype, residual.device) != (
            type(x), x.shape, x.dtype, x.device):
        return chain[-1](x), None
    summed = chain[-1]._normalize(x, residual, *(_kind(act) if act else (None, 0.01)))
    return summed, summed


# --- back -----------------------------------------------------------------------------------------

def fused_norms(root: nn.Module):
    """The layers whose activation a conversion fused, found from the modules it switched."""
    return list({id(n): n for m in root.modules() if isinstance(m, FusedActivation)
                 for n in m._fused_norms}.values())


def unfuse(root: nn.Module) -> nn.Module:
    """Undoes ``fuse`` in ``root``: modules back to their classes, the norms of the activation
    modules there plain (inside ``root`` or not: a fusion is undone whole)."""
    for m in root.modules():
        if isinstance(m, FusedActivation):
            for norm in m.__dict__.pop("_fused_norms"):
                norm.activation = None
        if isinstance(m, _Switched):
            object.__setattr__(m, "__class__", type(m)._fused_from)
    return root
