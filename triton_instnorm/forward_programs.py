"""What a module's forward computes, read from the structure a model declares, never by running
it: what fusion (fusion.py) decides from.

A ``Program``: value 0 is the forward's input, value i + 1 the result of step i; a step ``(op,
args)`` is ``self.<op>(value)`` or a sum, ``"+"`` or ``"+="`` (into its first term); ``ret`` is the
value returned; ``closed``: the steps are all the forward does (a child they do not call is not
called). Programs come from ``nn.Sequential``, ``register_block`` (not closed), ``KNOWN`` library
blocks whose forwards branch (by module path and qualified name, so the library need not be
installed), and the source of a forward that is straight-line code (``name = E``, ``name += E``, a
last ``return E``; ``E := name | self.<name>(E) | E + E``) compiling to the bytecode that runs.
Any other forward is unknown: it may call its children in any way.
"""

import ast
import collections
import functools
import inspect
import textwrap
import types

from torch import nn

__all__ = ["ADDS", "Program", "child", "free", "program", "register_block"]

Program = collections.namedtuple("Program", "steps ret closed")
ADDS = ("+", "+=")
HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_REGISTERED = {}  # class -> its (norm, activation) attribute pairs


def register_block(cls: type, pairs) -> None:
    """Declares that the forward of ``cls`` (not of its subclasses) applies, for each ``(norm,
    activation)`` pair of attribute names, the activation module to the norm's output and to
    nothing else, and uses that output nowhere else: ``convert_instance_norm(..., fuse_activation=
    True)`` fuses them. ``register_block(MyBlock, [("norm1", "act"), ("norm2", "act")])``."""
    pairs = tuple((str(norm), str(act)) for norm, act in pairs)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and pairs):
        raise TypeError("register_block takes an nn.Module subclass and (norm, activation) pairs")
    _REGISTERED[cls] = pairs


def free(m, hooks=True):
    """Calling ``m`` runs its class's forward (``self.<name>`` as usual), with no hook."""
    cls = type(m)
    return ("forward" not in m.__dict__ and cls.__call__ is nn.Module.__call__
            and cls._call_impl is nn.Module._call_impl and cls.__getattr__ is nn.Module.__getattr__
            and cls.__getattribute__ is object.__getattribute__
            and not (hooks and any(m.__dict__.get(name) for name in HOOKS)))


def child(m, name):
    """The child module ``self.<name>`` finds in ``m``, else None."""
    return None if name in m.__dict__ or _in_class(type(m), name) else m._modules.get(name)


@functools.lru_cache(maxsize=4096)
def _in_class(cls, name):
    """``name`` is found on the class before ``Module.__getattr__`` would look at children."""
    return any(name in vars(c) for c in cls.__mro__)


def program(m):
    """``m``'s forward as a Program, or None (unknown)."""
    cls = vars(type(m)).get("_fused_from", type(m))  # a block fusion switched
    if not free(m, hooks=False):
        return None
    if cls in _REGISTERED:  # each norm on the input, its activation on its output
        return Program(tuple(step for i, (norm, act) in enumerate(_REGISTERED[cls])
                             for step in ((norm, (0,)), (act, (2 * i + 1,)))), None, False)
    if isinstance(m, nn.Sequential) and cls.forward is nn.Sequential.forward and (
            cls.__iter__ is nn.Sequential.__iter__ and None not in m._modules.values()):
        return Program(tuple((k, (i,)) for i, k in enumerate(m._modules)), len(m._modules), True)
    if (cls.__module__, cls.__qualname__) in KNOWN:
        known = KNOWN[cls.__module__, cls.__qualname__]
        return _parse(known(m)) if "forward" in vars(cls) else None
    forward = inspect.getattr_static(cls, "forward", None)
    return _read(forward) if type(forward) is types.FunctionType else None


@functools.lru_cache(maxsize=512)
def _read(forward):
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
        compiled = next(c for c in compile(tree, forward.__code__.co_filename, "exec").co_consts
                        if isinstance(c, types.CodeType))
        if any(getattr(compiled, a) != getattr(forward.__code__, a) for a in (
                "co_code", "co_names", "co_varnames", "co_consts")):
            return None  # the file no longer holds the code that runs
        return _translate(tree.body[0])
    except (OSError, TypeError, SyntaxError, StopIteration, ValueError):
        return None


@functools.lru_cache(maxsize=64)
def _parse(source):
    return source and _translate(ast.parse(source).body[0])


def _translate(fn):
    args = fn.args
    if (not isinstance(fn, ast.FunctionDef) or fn.decorator_list or args.posonlyargs
            or args.vararg or args.kwonlyargs or args.kwarg or len(args.args) != 2):
        return None
    this, steps, names = args.args[0].arg, [], {args.args[1].arg: 0}

    def value(e):
        if isinstance(e, ast.Name) and e.id in names:
            return names[e.id]
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            steps.append(("+", (value(e.left), value(e.right))))
        elif (isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and len(e.args) == 1
              and not e.keywords and isinstance(e.func.value, ast.Name)
              and e.func.value.id == this):
            steps.append((e.func.attr, (value(e.args[0]),)))
        else:
            raise ValueError("not read")
        return len(steps)

    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    for line in body[:-1]:  # ``name = E`` and ``name += E``
        if isinstance(line, ast.Assign) and [type(t) for t in line.targets] == [ast.Name]:
            names[line.targets[0].id] = value(line.value)
        elif (isinstance(line, ast.AugAssign) and isinstance(line.op, ast.Add)
              and isinstance(line.target, ast.Name) and line.target.id in names):
            steps.append(("+=", (names[line.target.id], value(line.value))))
            names[line.target.id] = len(steps)
        else:
            return None
    if body and isinstance(body[-1], ast.Return) and body[-1].value is not None:
        ret = value(body[-1].value)
        return Program(tuple(steps), ret, True)


def _flag(m, name):
    return m.__dict__.get(name) if type(m.__dict__.get(name)) is bool else None


KNOWN = {  # (module, qualified name) -> the straight-line forward an instance runs (or None)
    ("monai.networks.blocks.dynunet_block", "UnetResBlock"): lambda m: (
        "def forward(self, inp):\n residual = inp\n out = self.conv1(inp)\n"
        " out = self.conv2(self.lrelu(self.norm1(out)))\n out = self.norm2(out)\n"
        + " residual = self.conv3(residual)\n" * hasattr(m, "conv3")  # as its forward asks
        + " residual = self.norm3(residual)\n" * hasattr(m, "norm3")
        + " out += residual\n return self.lrelu(out)"),
    ("dynamic_network_architectures.building_blocks.residual", "BasicBlockD"): lambda m: None if (
        None in (_flag(m, "apply_stochastic_depth"), _flag(m, "apply_se"))) else (
        "def forward(self, x):\n residual = self.skip(x)\n out = self.conv2(self.conv1(x))\n"
        + " out = self.drop_path(out)\n" * _flag(m, "apply_stochastic_depth")
        + " out = self.squeeze_excitation(out)\n" * _flag(m, "apply_se")
        + " out += residual\n return self.nonlin2(out)"),
}
