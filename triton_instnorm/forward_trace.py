"""Tracing one module's forward on a throw-away copy of its module tree (``forward_calls.py``
says when and what for): the calls of its submodules, each with the call whose output is its only
argument (``Call.source``) when that output goes nowhere else and both ran in the same grad and
autocast mode."""

import collections
import contextlib
import copy
import gc
import itertools
import weakref

import torch
from torch import fx, nn

__all__ = ["Call", "metas", "traced_calls"]


class Call:
    """One call of ``module`` in a forward (see the module docstring for ``source``)."""

    def __init__(self, module):
        self.module, self.source = module, None


class _Bypassed:
    """The forward of the copy's norms and activations: a call that skips ``Module.__call__``
    (``self.act.forward(y)``) is invisible to fx, so it makes the trace fail."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError("a norm or activation module's forward called directly")


class _OwnForward(fx.Tracer):
    """Records one module's own forward: every submodule is a leaf, buffers are proxies. For each
    submodule call it also keeps a weak reference to its output's proxy (``outputs``) and the
    grad mode and autocast state it ran in (``modes``): a helper function the forward calls may
    switch them, and the graph does not record that."""

    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self.outputs, self.modes = {}, {}

    def is_leaf_module(self, m, qualified_name):
        return True

    def call_module(self, m, forward, args, kwargs):
        proxy = super().call_module(m, forward, args, kwargs)
        if isinstance(proxy, fx.Proxy):
            self.outputs[proxy.node] = weakref.ref(proxy)
            self.modes[proxy.node] = _modes()
        return proxy


def _modes():
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")))


def _meta(t):
    meta = torch.empty_like(t, device="meta")
    return nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta


def metas(root):
    """{id(tensor): its meta copy} for ``root``'s parameters and buffers, made once per model."""
    copies = {}
    for t in itertools.chain(root.parameters(), root.buffers()):
        with contextlib.suppress(Exception):  # else copied, or failing, when a trace needs it
            copies[id(t)] = _meta(t)
    return copies


def _copy_value(v, memo):
    if isinstance(v, torch.Tensor):
        if id(v) not in memo:
            memo[id(v)] = _meta(v)
        return memo[id(v)]
    if type(v) in (list, tuple, set, frozenset):
        return type(v)(_copy_value(x, memo) for x in v)
    if type(v) is dict:
        return {k: _copy_value(x, memo) for k, x in v.items()}
    return copy.deepcopy(v, memo)


def _shadow(root, probed, metas):
    """A copy of ``root``'s tree to trace: same classes and attributes, tensors on the meta device
    (``metas`` holds those of the model's parameters and buffers), no hooks, ``_Bypassed``
    forwards on the modules in ``probed``; and {id(copy): original}."""
    memo, originals = dict(metas), {}
    for m in root.modules():
        memo[id(m)] = object.__new__(type(m))
        originals[id(memo[id(m)])] = m
    for m in root.modules():
        state = {}
        for key, value in m.__dict__.items():
            if key in ("_modules", "_parameters", "_buffers"):
                state[key] = type(value)((k, _copy_value(v, memo) if v is not None else None)
                                         for k, v in value.items())
            elif "hook" in key and isinstance(value, dict):
                state[key] = type(value)()
            else:
                state[key] = _copy_value(value, memo)
        if id(m) in probed:
            state["forward"] = _Bypassed()
        memo[id(m)].__dict__.update(state)
    return memo[id(root)], originals


def _held_outputs(tracer):
    """The call_module nodes whose proxies something still holds after the trace: the forward
    stored them (on a module, in a global or closed-over container, anywhere), invisible users.
    The trace ran the real code, so proxies it left in lists, deques and sets outside the copy
    are taken out again."""
    held = [(node, ref()) for node, ref in tracer.outputs.items() if ref() is not None]
    if held:
        gc.collect()  # only garbage cycles may still hold the others
        held = [(node, ref()) for node, ref in tracer.outputs.items() if ref() is not None]
    for _, proxy in held:
        for holder in gc.get_referrers(proxy):
            if isinstance(holder, (list, collections.deque)):
                with contextlib.suppress(Exception):
                    while proxy in holder:
                        holder.remove(proxy)
            elif isinstance(holder, set):
                holder.discard(proxy)
    return {node for node, _ in held}


def traced_calls(module, probed, metas):
    """The calls of ``module``'s forward, the same in training and eval mode, else None."""
    try:
        (graph, calls), (other, twins) = (_trace(module, probed, metas, t) for t in (True, False))
    except Exception:  # noqa: BLE001 - anything untraceable stays as it is
        return None
    if graph != other:
        return None
    for call, twin in zip(calls, twins, strict=True):
        if twin.source is None:  # (a mode switched differently in eval mode)
            call.source = None
    return calls


def _trace(module, probed, metas, training):
    """(the graph as text, its calls) of ``module``'s forward, traced on a copy."""
    shadow, originals = _shadow(module, probed, metas)
    for m in shadow.modules():
        m.training = training
    tracer = _OwnForward()
    with torch.set_grad_enabled(torch.is_grad_enabled()):  # as it was, whatever the code switched
        graph = tracer.trace(shadow)
    stored = _held_outputs(tracer)
    calls = {node: Call(originals[id(shadow.get_submodule(node.target))])
             for node in graph.nodes if node.op == "call_module"}
    for node, call in calls.items():
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (source in calls and len(source.users) == 1 and source not in stored
                and tracer.modes[source] == tracer.modes[node]):
            call.source = calls[source]
    return str(graph), list(calls.values())
