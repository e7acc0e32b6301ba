"""The transform matrix: every entry point of the package under every transform a PyTorch user
applies to a model, against torch (test_transforms.py runs it).

An *entry* builds a pair of modules with the same parameters and buffers: ours (our function,
our modules, a converted model, torch's model under ``enabled()``, the adaptive forms) and the
reference computing the same function with torch's ops. A *transform* runs a module and returns
its *outcome*: the tensors it produced (values, gradients or tangents, the running statistics
after the call), or the type of the exception it raised. A cell compares the two outcomes.
"""

import contextlib
import copy
import io
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from utils import DEVICE, randn

import triton_instnorm as tin

C = 3
SHAPES = {1: (2, C, 4), 2: (2, C, 3, 2), 3: (2, C, 2, 2, 2)}


# --- entry points ---------------------------------------------------------------------------

class TorchFunctional(nn.Module):
    """torch's ``F.instance_norm`` with affine parameters, running statistics (used in eval
    mode), then ``F.leaky_relu``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x):
        y = F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training)
        return F.leaky_relu(y, 0.2)


class Functional(TorchFunctional):
    """The same by ``tin.instance_norm``, the activation fused."""

    def forward(self, x):
        return tin.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 self.training, activation="leaky_relu", negative_slope=0.2)


class TorchAdaptive(nn.Module):
    """Adaptive instance norm with (1, C) scale, (C,) shift and silu, plus AdaIN with a style
    computed from the input, in torch's ops."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, C))
        self.shift = nn.Parameter(torch.zeros(C))

    def forward(self, x):
        view = (1, C) + (1,) * (x.dim() - 2)
        y = F.instance_norm(x)  # then the affine in y's dtype, as our kernel takes it
        y = F.silu(y * self.scale.view(view).to(y.dtype) + self.shift.view(view).to(y.dtype))
        style = x.flip(-1) * 2 + 1
        var, mean = torch.var_mean(style, tuple(range(2, x.dim())), correction=0, keepdim=True)
        return y + (F.instance_norm(x) * torch.sqrt(var + 1e-5) + mean).to(y.dtype)


class Adaptive(TorchAdaptive):
    """The same by ``adaptive_instance_norm`` and ``adain``."""

    def forward(self, x):
        return (tin.adaptive_instance_norm(x, self.scale, self.shift, activation="silu")
                + tin.adain(x, x.flip(-1) * 2 + 1))


def _torch_net(dims, activation, affine=True):
    norm = getattr(nn, f"InstanceNorm{dims}d")(C, affine=affine, track_running_stats=True)
    return nn.Sequential(norm, activation)


# dims: (activation, affine). Without affine parameters nothing in a layer requires grad when a
# graph is captured (a first layer normalizing the raw input), and its input gradient is taken
# later (a saliency map).
MODULES = {1: ("relu", nn.ReLU(), False), 2: ("silu", nn.SiLU(), True),
           3: ("gelu", nn.GELU(), True)}


def _module_pair(dims):
    name, act, affine = MODULES[dims]
    ours = getattr(tin, f"InstanceNorm{dims}d")(C, affine=affine, track_running_stats=True,
                                                activation=name)
    return ours, _torch_net(dims, act, affine)


def _converted_pair(fuse):
    ref = _torch_net(2, nn.LeakyReLU(0.2), affine=fuse)
    ours = tin.convert_instance_norm(copy.deepcopy(ref), fuse_activation=fuse)
    assert fuse == (ours[0].activation == "leaky_relu")
    return ours, ref


# name: (a function making (ours, reference), spatial dims, modes, runs under enabled()). Each
# mode runs a different kernel path (eval: normalized with the running statistics); the
# function and torch's modules under enabled() take both, the modules and models one each.
ENTRIES = {
    "functional": (lambda: (Functional(), TorchFunctional()), 2, ("train", "eval"), False),
    "InstanceNorm1d": (lambda: _module_pair(1), 1, ("train",), False),
    "InstanceNorm2d": (lambda: _module_pair(2), 2, ("eval",), False),
    "InstanceNorm3d": (lambda: _module_pair(3), 3, ("train",), False),
    "converted": (lambda: _converted_pair(False), 2, ("eval",), False),
    "converted, fused": (lambda: _converted_pair(True), 2, ("train",), False),
    "torch's modules under enabled()": (
        lambda: (_torch_net(2, nn.LeakyReLU(0.2)), _torch_net(2, nn.LeakyReLU(0.2))), 2,
        ("train", "eval"), True),
    "adaptive_instance_norm and adain": (lambda: (Adaptive(), TorchAdaptive()), 2, ("train",),
                                         False),
}


def build(entry: str, mode: str):
    """(ours, reference, input, context for ours) in ``mode``: random parameters and running
    statistics, the same in both, on DEVICE."""
    make, dims, _, routed = ENTRIES[entry]
    ours, ref = make()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=g)
            elif t.is_floating_point():
                t.normal_(generator=g).add_(0.5)
    ours.load_state_dict(_renamed(ours, ref))
    train = mode == "train"
    ours, ref = ours.to(DEVICE).train(train), ref.to(DEVICE).train(train)
    x = randn(*SHAPES[dims], seed=1, dtype=torch.float32) * 2 + 0.5
    return ours, ref, x, (tin.enabled if routed else contextlib.nullcontext)


def _renamed(ours, ref):
    """ref's state dict under ours' names (the same tensors in the same order)."""
    keys, values = list(ours.state_dict()), list(ref.state_dict().values())
    assert len(keys) == len(values)
    return dict(zip(keys, values))


# --- transforms -----------------------------------------------------------------------------

def _buffers(m):
    return [b.detach().clone() for b in m.buffers()]


def _dy(y, seed=2):
    return randn(*y.shape, seed=seed, dtype=y.dtype)


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


def _grads(y, inputs):
    return list(torch.autograd.grad((y * _dy(y)).sum(), inputs, allow_unused=True))


def eager(m, x):
    x = _leaf(x)
    y = m(x)
    return [y, *_grads(y, [x, *_params(m)]), *_buffers(m)]


def no_grad(m, x):
    with torch.no_grad():
        return [m(x), *_buffers(m)]


def inference_mode(m, x):
    with torch.inference_mode():
        return [m(x).clone(), *_buffers(m)]


def autocast(m, x):
    device_type, dtype = ("cuda", torch.float16) if DEVICE == "cuda" else ("cpu", torch.bfloat16)
    with torch.autocast(device_type, dtype=dtype):
        y = m(x.to(dtype))
    return [y, *_buffers(m)]


def _compiled(m, **options):
    torch._dynamo.reset()
    return torch.compile(m, fullgraph=True, backend="aot_eager", **options)


def compile_fullgraph(m, x):
    return eager(_compiled(m), x)


def compile_dynamic(m, x):
    return _two_batch_sizes(_compiled(m, dynamic=True), m, x)


def _two_batch_sizes(run, m, x):
    return [run(x), run(torch.cat([x, x[:1] * 0.5 - 1])), *_buffers(m)]


def export_then_differentiate(m, x):
    """Captured without grad, differentiated later (a saliency map of an exported model)."""
    gm = torch.export.export(m, (x,)).module()
    x = _leaf(x)
    y = gm(x)
    return [y, *_grads(y, [x, *_params(gm)]), *_buffers(gm)]


def jit_trace_then_differentiate(m, x):
    """torch.jit.trace with its default check, captured without grad, differentiated later."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation, the tracer's warnings
        traced = torch.jit.trace(m, (x,))
    x = _leaf(x)
    y = traced(x)
    return [y, *_grads(y, [x, *_params(m)]), *_buffers(m)]


def jit_script(m, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(m)
    return [scripted(x), *_buffers(m)]


def vmap_over_batch(m, x):
    return [torch.func.vmap(m)(x.unsqueeze(1)), *_buffers(m)]


def vmap_over_stacked_models(m, x):
    """PyTorch's model-ensembling recipe: stack_module_state + functional_call + vmap."""
    other = copy.deepcopy(m)
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.is_floating_point():
                t.mul_(1.5).add_(0.25)
    params, buffers = torch.func.stack_module_state([m, other])
    base = copy.deepcopy(m).to("meta")

    def call(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    y = torch.func.vmap(call, in_dims=(0, 0, None))(params, buffers, x)
    return [y, *[b.clone() for b in buffers.values()]]


def func_jvp(m, x):
    return [*torch.func.jvp(m, (x,), (_dy(x, 3),)), *_buffers(m)]


def jacfwd(m, x):
    return [torch.func.jacfwd(m)(x), *_buffers(m)]


def forward_ad(m, x):
    with fwAD.dual_level():
        y = fwAD.unpack_dual(m(fwAD.make_dual(x, _dy(x, 3))))
    return [y.primal, y.tangent, *_buffers(m)]


def autograd_functional_jvp(m, x):
    return [*torch.autograd.functional.jvp(m, x, _dy(x, 3)), *_buffers(m)]


def func_grad(m, x):
    return [torch.func.grad(lambda x: (m(x) * _dy(x)).sum())(x), *_buffers(m)]


def jacrev(m, x):
    return [torch.func.jacrev(m)(x), *_buffers(m)]


def _check(check, m, x):
    """torch.autograd.gradcheck / gradgradcheck in float64 with respect to the input (the
    eager cell compares the parameters' gradients with torch's); the outcome is True or the
    exception."""
    m = copy.deepcopy(m).double()
    return [torch.tensor(check(m, (_leaf(x.double()),), fast_mode=True))]


def gradcheck(m, x):
    return _check(torch.autograd.gradcheck, m, x)


def gradgradcheck(m, x):
    return _check(torch.autograd.gradgradcheck, m, x)


def _onnx(m, x, **options):
    """onnxruntime's output of the exported model, and the buffers after the export."""
    import onnxruntime

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), f, **options)
    session = onnxruntime.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return [torch.from_numpy(y), *[b.cpu() for b in _buffers(m)]]


def onnx_default(m, x):
    return _onnx(m, x)


def onnx_torchscript(m, x):
    return _onnx(m, x, dynamo=False)


def _inference_graph(m, x):
    """What the default (dynamo) exporter gives for torch's own model: the function the model
    computes in its mode, as a graph without state (the running statistics stay as they were)."""
    buffers = [b.cpu() for b in _buffers(m)]
    with torch.no_grad():
        return [copy.deepcopy(m)(x).cpu(), *buffers]


TRANSFORMS = {
    "eager": eager,
    "no_grad": no_grad,
    "inference_mode": inference_mode,
    "autocast": autocast,
    "torch.compile(fullgraph=True)": compile_fullgraph,
    "torch.compile(dynamic=True)": compile_dynamic,
    "torch.export, then differentiate": export_then_differentiate,
    "torch.jit.trace, then differentiate": jit_trace_then_differentiate,
    "torch.jit.script": jit_script,
    "vmap over the batch": vmap_over_batch,
    "vmap over stacked models": vmap_over_stacked_models,
    "torch.func.jvp": func_jvp,
    "torch.func.jacfwd": jacfwd,
    "forward_ad dual tensors": forward_ad,
    "torch.autograd.functional.jvp": autograd_functional_jvp,
    "torch.func.grad": func_grad,
    "torch.func.jacrev": jacrev,
    "gradcheck": gradcheck,
    "gradgradcheck": gradgradcheck,
    "ONNX, default exporter": onnx_default,
    "ONNX, dynamo=False": onnx_torchscript,
}
# The reference's outcome under these is what its eager run gives, which torch guarantees for
# compiled code and the dynamo exporter's graph, and which costs a fraction of doing both twice.
EAGER_ORACLE = {"torch.compile(fullgraph=True)": eager,
                "torch.compile(dynamic=True)": lambda m, x: _two_batch_sizes(m, m, x),
                "ONNX, default exporter": _inference_graph}
# Tolerance per transform (absolute and relative); float32 elsewhere.
LOOSE = {"autocast": 5e-2}


def outcome(run, m, x, context=contextlib.nullcontext):
    """``run(m, x)`` (a transform) inside ``context()``: its tensors, or the exception's type."""
    try:
        with context():
            return run(m, x)
    except Exception as e:  # noqa: BLE001  (the exception is the outcome compared)
        return type(e)
