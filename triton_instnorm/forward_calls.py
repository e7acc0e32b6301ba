"""Which modules a model's forwards call, and on what: what activation fusion decides from.

A ``Call`` is one call of a module in some forward; its ``source`` is the call whose output is its
only argument, when that output goes nowhere else. ``survey`` finds them:

- ``nn.Sequential`` (its own ``forward``): each child's output feeds the next child only.
- A forward whose source shows it reaching past its children, or that cannot be read: its whole
  subtree is ``blocked``. Reaching past: ``self.block.act``, ``self.seq[1]``,
  ``self.seq._modules``, iterating a module that is not a container, a submodule handed to a
  function or another module (a trace would not see a block called inside a leaf), or held in a
  name and used other than by calling it, ``self`` handed on, its own methods.
- A forward that is straight-line code (no ``if``, ternary, ``and``/``or``, ``while``, ``try``,
  ``match``, filtered comprehension, element picked by a value, own method, stored callable or
  ``super()``; the functions it calls are taken as traced) is traced (``forward_trace.py``), in
  training and in eval mode (identical graphs required), on a throw-away copy of its module tree.
  An output that anything still holds after the trace is one more user, and a call's output
  feeds the next call only if both ran in the same grad mode and autocast state (``with
  torch.no_grad()``, a helper that switches it). A forward that cannot call any candidate is not
  traced.
- Any other forward (it branches, fails to trace, its module cannot be copied, or it has its own
  ``__call__`` or instance ``forward``) is taken to call its own children, directly or through
  ``ModuleList``/``ModuleDict``: the candidates among those are ``blocked``.

Not seen: modules reached through unregistered references or globals. Tracing runs a forward's
Python code once per mode on the copy: side effects outside the model happen then (the proxies it
leaves in lists, deques and sets are taken out again).
"""

import ast
import functools
import inspect
import itertools
import textwrap

import torch
from torch import nn

from .forward_trace import Call, metas, traced_calls

__all__ = ["Call", "plain_call", "survey"]

_BRANCHES = tuple(getattr(ast, name) for name in (
    "If", "IfExp", "BoolOp", "While", "Try", "TryStar", "Match") if hasattr(ast, name))
_DATA = (torch.Tensor, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def plain_call(m):
    """Calling ``m`` runs its class's ``forward`` (no ``__call__`` or instance ``forward`` of its
    own)."""
    return "forward" not in m.__dict__ and type(m).__call__ is nn.Module.__call__


def _is_container(m):
    """ModuleList, ModuleDict and the like: no forward, so they call nothing themselves."""
    return type(m).forward is nn.Module.forward and plain_call(m)


def _is_sequential(m):
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and type(m).__iter__ is nn.Sequential.__iter__ and plain_call(m))


# --- reading a forward's source -------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _parse(forward):
    func = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(forward)))).body[0]
    return func, {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}


def _read_forward(module, relevant):
    """(straight, reaches_in) for ``module``'s own forward. ``straight``: it can take one path only
    (see the module docstring). ``reaches_in``: it may call a relevant module that is not its child
    nor an element of a container child. Unreadable source: (False, True)."""
    try:
        func, parents = _parse(type(module).forward)
        this = (func.args.posonlyargs + func.args.args)[0].arg
    except Exception:  # noqa: BLE001 - no source (built in, generated, lambda): assume the worst
        return False, True
    straight = not any(isinstance(n, _BRANCHES) or isinstance(n, ast.comprehension) and n.ifs
                       for n in ast.walk(func))
    reaches_in, module_nodes = False, {}
    for node in ast.walk(func):
        if isinstance(node, ast.Name) and node.id == "super":
            straight, reaches_in = False, True
        elif isinstance(node, ast.Name) and node.id == this:
            outcome = _follow(module, node, parents, relevant, module_nodes)
            straight &= outcome != "escapes"
            reaches_in |= outcome in ("escapes", "in")
    # A name holding a submodule (``conv = self.conv``, ``for block in self.blocks``,
    # ``zip(self.norms, self.acts)``) may only be called: anything else (``block.act``,
    # ``block[1]``, handing it to a function) may reach past the child unseen.
    bound = set()
    for node in ast.walk(func):
        if isinstance(node, (ast.For, ast.comprehension)) and _yields_modules(
                node.iter, module_nodes):
            bound |= _names(node.target)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value and any(
                n in module_nodes for n in _elements(node.value)):
            bound |= set().union(*map(_names, getattr(node, "targets", [])),
                                 _names(getattr(node, "target", None)))
    reaches_in |= any(
        isinstance(n, ast.Name) and n.id in bound and isinstance(n.ctx, ast.Load)
        and not (isinstance(parents.get(n), ast.Call) and parents[n].func is n)
        for n in ast.walk(func))
    reaches_in |= any(relevant(obj) and not _plain_use(node, kind, parents)
                      for node, (kind, obj) in module_nodes.items())
    # An element picked by a value (``self.layers[i]``, ``self.acts[self.mode]``) may be another
    # one at the next call: the trace would hold only this one.
    straight &= all(kind != "element" or _constant(node.slice)
                    for node, (kind, _) in module_nodes.items())
    return straight, reaches_in


def _plain_use(node, kind, parents):
    """The submodule expression ``node`` is called, followed further (``.attr``, ``[i]``: judged
    there), or bound to a name (judged by the name's uses); a container may also be iterated
    (directly or through zip/enumerate/reversed) or measured with len. Anything else (iterating
    an ``nn.Sequential``, handing a block to a function or another module) may reach past it."""
    up = parents.get(node)
    if isinstance(up, ast.Call) and up.func is node:
        return True
    if isinstance(up, (ast.Attribute, ast.Subscript)) and up.value is node:
        return True
    while isinstance(up, (ast.Tuple, ast.List)):
        up = parents.get(up)
    if isinstance(up, (ast.Assign, ast.AnnAssign, ast.NamedExpr)):
        return True
    if kind != "container":
        return False
    if isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id == "len":
        return True
    while isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id in (
            "zip", "enumerate", "reversed"):
        node, up = up, parents.get(up)
    return isinstance(up, (ast.For, ast.comprehension)) and up.iter is node


def _yields_modules(expr, module_nodes):
    """Iterating ``expr`` gives submodules: a module, or zip/enumerate/reversed of one."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in (
            "zip", "enumerate", "reversed"):
        return any(_yields_modules(a, module_nodes) for a in expr.args)
    return expr in module_nodes


def _names(target):
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)} if target else set()


def _elements(value):
    return [value] if not isinstance(value, (ast.Tuple, ast.List)) else [
        n for v in value.elts for n in _elements(v)]


def _holds(value, relevant):
    """``value`` is a dict, list, tuple or set with a relevant module among its values."""
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple, set, frozenset)):
        return False
    return any(isinstance(v, nn.Module) and relevant(v) for v in value)


def _constant(index):
    """``self.layers[0]``, ``self.layers[-1]``, ``self.acts["relu"]``: the same element at every
    call."""
    if isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub):
        index = index.operand
    return isinstance(index, ast.Constant)


def _follow(module, node, parents, relevant, module_nodes):
    """Where the expression ``self...`` starting at ``node`` leads: 'data', 'child' (a child or
    a container element), 'in' (past a child) or 'escapes' (``self`` itself handed on, or one of
    its own methods or properties run)."""
    obj, elements, cur = module, False, node
    while True:
        up = parents.get(cur)
        if isinstance(up, ast.Subscript) and up.value is cur and obj is not module:
            if not (elements or _is_container(obj)):
                return "in" if relevant(obj) else "data"  # ``self.seq[1]``: past a child
            elements, cur = True, up
            module_nodes[up] = ("element", obj)
            continue
        if not (isinstance(up, ast.Attribute) and up.value is cur):
            return "escapes" if cur is node else "child"
        if elements:
            return "in"  # an attribute of a container's element
        if up.attr in obj._modules:
            sub = obj._modules[up.attr]
            if obj is not module and not _is_container(obj):
                return "in" if sub is not None and relevant(sub) else "data"
            if sub is None:
                return "data"
            obj, cur = sub, up
            module_nodes[up] = ("container" if _is_container(sub) else "module", sub)
            continue
        if obj is not module and not _is_container(obj):
            # past a child: its tensors and plain values are data, anything else (its
            # ``_modules``, a method, a stored callable) may reach its submodules
            value = obj._parameters.get(up.attr, obj._buffers.get(up.attr, obj.__dict__.get(
                up.attr, inspect.getattr_static(type(obj), up.attr, None))))
            return "data" if isinstance(value, _DATA) or not relevant(obj) else "in"
        if up.attr in obj.__dict__ and callable(obj.__dict__[up.attr]):
            return "escapes"  # a stored function or lambda: code this reading does not see
        if up.attr in obj.__dict__ and _holds(obj.__dict__[up.attr], relevant):
            return "in"  # ``self._modules[name]``, a plain dict or list of submodules
        if up.attr in obj.__dict__ or up.attr in obj._parameters or up.attr in obj._buffers:
            return "data"
        static = inspect.getattr_static(type(obj), up.attr, None)
        if static is None or not (callable(static) or hasattr(static, "__get__")):
            return "data"  # a class-level constant, or nothing (AttributeError when run)
        if obj is module:
            return "escapes"  # its own method or property: code this reading does not see
        return "in" if relevant(obj) else "data"


# --- the survey -----------------------------------------------------------------------------------

def survey(root, candidates):
    """Every call of a candidate the model's forwards make, and the candidates that must stay as
    they are because an untraced forward may call them."""
    relevant_memo = {}

    def relevant(m):
        if id(m) not in relevant_memo:
            relevant_memo[id(m)] = id(m) in candidates  # also ends a cycle, should one exist
            relevant_memo[id(m)] = id(m) in candidates or any(
                relevant(c) for c in m._modules.values() if c is not None)
        return relevant_memo[id(m)]

    calls, blocked, tensors = [], set(), None
    for m in root.modules():
        has_children = any(c is not None for c in m._modules.values())
        if not has_children or _is_container(m) or not relevant(m):
            continue
        if _is_sequential(m):
            chain = [Call(c) for c in m._modules.values() if c is not None]
            for previous, call in itertools.pairwise(chain):
                call.source = previous
            calls += chain
            continue
        straight, reaches_in = _read_forward(m, relevant) if plain_call(m) else (False, True)
        if reaches_in:
            # A trace would not see it all either: a block handed to a leaf module is called
            # inside that leaf.
            blocked |= {id(sub) for sub in m.modules()}
            continue
        reach = {id(sub) for sub in _direct_reach(m)}
        if not reach & candidates:
            continue  # it can call none of them: no need to trace it
        if straight and tensors is None:
            tensors = metas(root)
        traced = traced_calls(m, candidates, tensors) if straight else None
        if traced is not None:
            calls += traced
        else:
            blocked |= reach
    return calls, blocked


def _direct_reach(m):
    for child in m._modules.values():
        if child is not None:
            yield child
            if _is_container(child):
                yield from _direct_reach(child)
