"""Fusion on conversion (``convert_instance_norm(model, fuse_activation=True)``), decided from what
each forward is known to compute: no code of the model runs, and nothing changes but the norms, the
activation modules fused into them (``FusedActivation``, an identity) and the residual blocks whose
sums move into norms (``FusedResidual``), both subclasses of the module's own class."""

import ast
import collections
import functools
import inspect
import operator
import textwrap
import types

import torch
from torch import nn

from . import activations
from .modules import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__all__ = ["FusedActivation", "FusedResidual", "fuse", "register_block", "unfuse"]

_NORMS = (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_RETURN, _UNKNOWN = "return", "unknown"  # a value's use by the return; what no program shows
_REGISTERED = {}  # class -> the Program its registration declares

# What a forward computes: value 0 is its input, value i + 1 step i's result; a step ``(op,
# inputs)`` is ``self.<op>(value)``, or the sum ``operator.add`` or ``operator.iadd`` (``+=``).
# ``returned``: None if the steps are not all it does. ``uses``: each value's steps (then _RETURN).
Program = collections.namedtuple("Program", "steps returned uses")


def _program(steps, returned):
    uses = [[] for _ in range(len(steps) + 1)]
    for i, (_, inputs) in enumerate(steps):
        for value in inputs:
            uses[value].append(i)
    if returned is not None:
        uses[returned].append(_RETURN)
    return Program(tuple(steps), returned, tuple(map(tuple, uses)))


def register_block(cls: type, pairs) -> None:
    """Declares that the forward of ``cls`` (not of its subclasses) applies, for each ``(norm,
    activation)`` pair of attribute names, the activation to the norm's output, its only use:
    ``register_block(MyBlock, [("norm1", "act"), ("norm2", "act")])``."""
    pairs = [(str(norm), str(act)) for norm, act in pairs]
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and pairs):
        raise TypeError("register_block takes an nn.Module subclass and (norm, activation) pairs")
    _REGISTERED[cls] = _program([step for i, (norm, act) in enumerate(pairs)
                                 for step in ((norm, (0,)), (act, (2 * i + 1,)))], None)


def _plain_call(m, hooks_matter=True):
    """Calling ``m`` runs its class's forward, ``self.<name>`` finds children, no hook sees it."""
    cls = type(m)
    return ("forward" not in m.__dict__ and cls.__call__ is nn.Module.__call__
            and cls._call_impl is nn.Module._call_impl and cls.__getattr__ is nn.Module.__getattr__
            and cls.__getattribute__ is object.__getattribute__
            and not (hooks_matter and any(map(m.__dict__.get, _HOOKS))))


def _child(m, op):
    """The child module ``self.<op>`` is in ``m``, else None (a sum, an attribute, a property)."""
    shadowed = not isinstance(op, str) or op in m.__dict__ or _in_class(type(m), op)
    return None if shadowed else m._modules.get(op)


# (a name the class has is found before ``Module.__getattr__`` looks at the children)
_in_class = functools.lru_cache(4096)(lambda cls, name: any(name in vars(c) for c in cls.__mro__))
_sequential = functools.lru_cache(1024)(  # (the program of a Sequential by its children's names)
    lambda names: _program([(name, (i,)) for i, name in enumerate(names)], len(names)))


def program(m):
    """``m``'s forward as a Program, or None: unknown, it may call its children in any way."""
    cls = vars(type(m)).get("_fused_from", type(m))  # a block fusion switched: as its own class
    if not _plain_call(m, hooks_matter=False):
        return None
    if cls in _REGISTERED:
        return _REGISTERED[cls]
    if isinstance(m, nn.Sequential):  # (its forward calls each child in turn)
        plain = cls.forward is nn.Sequential.forward and cls.__iter__ is nn.Sequential.__iter__
        return _sequential(tuple(m._modules)) if plain and None not in m._modules.values() else None
    if known := KNOWN.get((cls.__module__, cls.__qualname__)):
        return _parse(known(m))
    forward = inspect.getattr_static(cls, "forward", None)
    return _read(forward) if type(forward) is types.FunctionType else None


@functools.lru_cache(maxsize=512)
def _read(forward):
    """The Program of a forward's source, if its file still holds the code that runs."""
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        code = forward.__code__  # (what the file holds runs if its code and names are the same)
        compiled = next(c for c in compile(source, code.co_filename, "exec").co_consts
                        if isinstance(c, types.CodeType) and c.co_names == code.co_names)
        return _parse(source) if compiled.co_code == code.co_code else None
    except (OSError, TypeError, SyntaxError, StopIteration, ValueError):
        return None


@functools.lru_cache(maxsize=512)
def _parse(source):
    """The Program of ``def f(self, x):`` whose lines are ``name = E`` and ``name += E`` then
    ``return E``, where ``E := name | self.<name>(E) | E + E``; else None (or ValueError)."""
    match ast.parse(source).body[0] if source else None:
        case ast.FunctionDef(args=ast.arguments(args=[ast.arg(this), ast.arg(x)]),
                             body=[*lines, ast.Return(ast.expr() as returned)]):
            steps, names = [], {x: 0}  # name -> the value it holds (any other name: not read)
        case _:
            return None

    def value(e):  # the value ``e`` makes, its steps appended in Python's order of evaluation
        match e:
            case ast.Name(name) if name in names:
                return names[name]
            case ast.BinOp(left, ast.Add(), right):
                steps.append((operator.add, (value(left), value(right))))
            case ast.Call(ast.Attribute(ast.Name(name), op), [arg], []) if name == this:
                steps.append((op, (value(arg),)))
            case _:
                raise ValueError("not read")
        return len(steps)

    for line in lines:
        match line:
            case ast.Assign([ast.Name(name)], e) if name != this:
                names[name] = value(e)
            case ast.AugAssign(ast.Name(name) as target, ast.Add(), e) if name != this:
                steps.append((operator.iadd, (value(target), value(e))))  # name's value, E, sum
                names[name] = len(steps)
            case _:
                return None
    return _program(steps, value(returned))


KNOWN = {  # (module, qualified name) -> the straight-line forward an instance runs (or None)
    ("monai.networks.blocks.dynunet_block", "UnetResBlock"): lambda m: (  # (it asks hasattr too)
        "def forward(self, inp):\n residual = inp\n"
        " out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(inp)))))\n"
        + " residual = self.conv3(residual)\n" * hasattr(m, "conv3")
        + " residual = self.norm3(residual)\n" * hasattr(m, "norm3")
        + " out = out + residual\n return self.lrelu(out)"),  # (``+=`` into norm2's output)
    ("dynamic_network_architectures.building_blocks.residual", "BasicBlockD"): lambda m: (
        None if any(m.__dict__.get(f) is not False for f in ("apply_stochastic_depth", "apply_se"))
        else "def forward(self, x):\n residual = self.skip(x)\n out = self.conv2(self.conv1(x))\n"
        " out += residual\n return self.nonlin2(out)"),  # (unknown with either flag on)
}


def fuse(root: nn.Module) -> nn.Module:
    """Fuses activations and residual sums throughout ``root``: forwards with a program are inlined
    where they are called plainly, and an activation fuses when each of its inputs comes from a
    norm it alone takes, or from a sum that moves into a norm (``_other_term``)."""
    if any(getattr(nn.modules.module, "_global" + name, None) for name in _HOOKS):
        return root  # a global hook sees every norm's output
    modules, sums, done = {}, set(), set()  # id -> module; (block id, step) of each sum that moves
    takers, makers = collections.defaultdict(set), collections.defaultdict(set)  # id -> keys
    contexts = [(root, True)]  # (module, whether what calls it is unknown)
    def inline(m, x, top=False):
        """Appends to ``flat`` what calling ``m`` on value ``x`` runs, returns its output's."""
        modules[id(m)], prog, called = m, program(m), set()
        if not top and not (prog and prog.returned is not None and _plain_call(m)):
            contexts.append((m, False))  # not inlined: what its forward runs, on its own
            flat.append((id(m), (x,)))
            return len(flat)
        values = [x]
        for k, (op, inputs) in enumerate(prog.steps if prog else ()):
            if (c := _child(m, op)) is not None:
                values.append(inline(c, values[inputs[0]]))
                called.add(id(c))
                continue
            norm = modules.get(flat[-1][0]) if flat and values[k] == len(flat) else None
            if _bare_norm(norm) and _other_term(m, prog, k) is not None:  # made a term just now
                sums.add((id(m), k))
            flat.append(((id(m), k), tuple(values[v] for v in inputs)))
            values.append(len(flat))
        if prog and prog.returned is not None:
            return values[prog.returned]
        contexts.extend((c, True) for c in m._modules.values()  # it may call them in any way
                        if c is not None and id(c) not in called)
    while contexts:
        m, unknown_caller = contexts.pop()
        if (id(m), unknown_caller) in done or isinstance(m, torch.jit.ScriptModule):
            continue  # (compiled: left whole)
        done.add((id(m), unknown_caller))
        # value 0: the context's input; entries (module id, (input,)) or ((block id, step), inputs)
        flat = [(id(m), (0,))] if unknown_caller else []
        uses = _program(flat, inline(m, 0, top=True)).uses
        for j, (key, (made, *_)) in enumerate(flat):
            if isinstance(key, int):  # a module's call: what takes its output, makes its input
                single = len(uses[j + 1]) == 1 and uses[j + 1][0] != _RETURN
                takers[key].add(flat[uses[j + 1][0]][0] if single else _UNKNOWN)
                makers[key].add(flat[made - 1][0] if made and uses[made] == (j,) else _UNKNOWN)
    for key, act in modules.items():  # (object's setattr: no __setattr__ of theirs runs)
        kind = not isinstance(act, _Switched) and _plain_call(act) and activations.of_module(act)
        norms = [modules.get(n) for n in makers[key] - sums]
        if kind and makers[key] and all(_bare_norm(n) and takers[id(n)] == {key} for n in norms):
            for norm in norms:
                norm.activation, norm.negative_slope = kind
            object.__setattr__(act, "_fused_norms", norms)
            object.__setattr__(act, "__class__", _switched(type(act), FusedActivation))
    for key in {key for key, _ in sums if not isinstance(modules[key], _Switched)}:
        object.__setattr__(modules[key], "__class__", _switched(type(modules[key]), FusedResidual))
    return root


def _bare_norm(m):  # one of our norms, called plainly, with no activation yet: it can take one
    return type(m) in _NORMS and _plain_call(m) and m.activation is None


def _other_term(block, prog, k):
    """The other term of the sum at step k if the call before it makes a term nothing else takes
    (``+=`` adding into it: a tensor no one else sees) and so can make the sum; else None."""
    op, terms = prog.steps[k] if k < len(prog.steps) else ("", ())
    if (isinstance(op, str) or not k or k not in terms or prog.uses[k] != (k,) or (
            op is operator.iadd and terms[0] != k) or _child(block, prog.steps[k - 1][0]) is None):
        return None
    return terms[1] if terms[0] == k else terms[0]


class _Switched:
    """A subclass of a module's own class (``_fused_from``) that pickles and copies as itself."""

    def __reduce_ex__(self, protocol):
        return (_Switched._new, (type(self)._fused_from, type(self).__bases__[0]),
                *super().__reduce_ex__(protocol)[2:])

    @staticmethod
    def _new(cls, mixin):  # (what unpickling calls)
        return object.__new__(_switched(cls, mixin))


@functools.lru_cache(maxsize=None)
def _switched(cls, mixin):
    return type(cls.__name__, (mixin, cls), dict(
        _fused_from=cls, __module__=cls.__module__, __qualname__=cls.__qualname__))


class FusedActivation(_Switched):
    """A fused activation module: an identity (its norms, ``_fused_norms``, apply it)."""

    def forward(self, input):
        return input

    def extra_repr(self) -> str:  # (shows in the model's repr)
        return ", ".join(filter(None, (super().extra_repr(), "fused into the preceding norm")))


class FusedResidual(_Switched):
    """A residual block whose sums its norms make where they can, checked at each call."""

    def forward(self, *args, **kwargs):
        if (prog := program(self)) is None:  # a flag changed: its fused activations need one
            raise RuntimeError(f"{type(self).__name__} changed since its sums were fused: "
                               "revert_instance_norm, change it, convert again")
        x = args[0] if len(args) == 1 and not kwargs else [*inspect.signature(type(
            self)._fused_from.forward).bind(self, *args, **kwargs).arguments.values()][1]

        def activation_taking(value):  # the fused activation module that alone takes it
            uses = prog.uses[value]
            act = _child(self, prog.steps[uses[0]][0]) if uses[0] != _RETURN else None
            return act if len(uses) == 1 and isinstance(act, FusedActivation) else None

        values, made = [x], {}  # made: step -> the sum a norm made
        for i, (op, inputs) in enumerate(prog.steps):
            terms = [values[v] for v in inputs]
            if i in made:
                value = made.pop(i)
            elif (other := _other_term(self, prog, i + 1)) is not None:
                value, summed = _call_adding(_child(self, op), terms[0], values[other],
                                             activation_taking(i + 2))  # (i + 2: the sum's)
                if summed:
                    made[i + 1] = value
            elif isinstance(op, str):
                value = getattr(self, op)(*terms)
            else:  # a sum as written, then the activation its fused module no longer applies
                act, value = activation_taking(i + 1), op(*terms)
                value = value if act is None else type(act)._fused_from.forward(act, value)
            values.append(value)
            for v in inputs:  # dropped after its last use, as the forward's names would free it
                if prog.uses[v][-1] == i:
                    values[v] = None
        return values[prog.returned]


def _call_adding(m, x, other, act):
    """(act(m(x) + other), True) made by the norm ending m's chain of calls; else (m(x), False):
    a hook, another layer, a forward not such a chain, a sum that would broadcast or promote."""
    if _bare_norm(m) and isinstance(x, torch.Tensor) and type(other) is type(x) and (
            other.shape, other.dtype, other.device) == (x.shape, x.dtype, x.device):
        kind = activations.of_module(act, type(act)._fused_from) if act else (None, 0.01)
        return m._normalize(x, other, *kind), True
    prog = program(m) if type(m) not in _NORMS and _plain_call(m) else None
    chain = prog and prog.steps and prog == _sequential(tuple(op for op, _ in prog.steps))
    if not (chain and (last := _child(m, prog.steps[-1][0])) is not None):
        return m(x), False
    for op, _ in prog.steps[:-1]:
        x = getattr(m, op)(x)
    return _call_adding(last, x, other, act)


def unfuse(root: nn.Module) -> nn.Module:
    """Undoes ``fuse`` in ``root`` (the norms of its activation modules, inside it or not)."""
    for m in root.modules():
        for norm in m.__dict__.pop("_fused_norms", ()):  # (a FusedActivation's)
            norm.activation = None
        if isinstance(m, _Switched):
            object.__setattr__(m, "__class__", type(m)._fused_from)
    return root
