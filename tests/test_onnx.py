"""ONNX export with torch's defaults and both exporters: onnxruntime against our layers,
standard domain only. A model exports as torch's does, with no extra argument; graphs captured
earlier (an ExportedProgram, a traced ScriptModule) export with our translations.

The export tests need onnx, onnxruntime and onnxscript (the ``onnx`` extra) and skip without
them; the test that importing the package leaves torch's internals alone always runs.
"""

import copy
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
from utils import DEVICE

import triton_instnorm as tin

nn = torch.nn
OPS = torch.ops.triton_instnorm
needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs the onnx extra: onnx, onnxruntime, onnxscript")
# How a model reaches ONNX: torch.onnx.export of the model with no extra argument (the default
# exporter, dynamo in torch 2.13) or with dynamo=False; or of a graph captured earlier, which
# holds our operators: an ExportedProgram (with our translation table) or a traced ScriptModule.
EXPORTERS = ["default", "torchscript"]
CAPTURED = ["exported_program", "traced"]
TOL = dict(atol=2e-5, rtol=2e-5)


def _export(model, args, how, path, **options):
    """Exports the nn.Module ``model`` ``how`` (EXPORTERS, CAPTURED), checks that the graph uses
    the standard domain only, and returns onnxruntime's outputs and the graph's op types."""
    import onnx
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        if how == "exported_program":
            model = torch.export.export(model, args)
            assert any(n.target == OPS.forward.default for n in model.graph.nodes)
            options["custom_translation_table"] = tin.onnx_translation_table()
        elif how == "traced":
            model = torch.jit.trace(model, args)
            assert "triton_instnorm::forward" in str(model.inlined_graph)
        if how in ("torchscript", "traced"):
            options["dynamo"] = False
        torch.onnx.export(model, args, str(path), **options)
    proto = onnx.load(str(path))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert not proto.functions and {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
    return outputs, [node.op_type for node in proto.graph.node]


def _randomize(layer):
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name == "running_var":
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_()
    return layer


LAYERS = [  # (class, input shape, arguments): every activation, affine or not, 1d/2d/3d
    ("InstanceNorm1d", (2, 3, 7), dict()),
    ("InstanceNorm2d", (2, 3, 5, 4), dict(affine=True, activation="relu")),
    ("InstanceNorm3d", (2, 3, 3, 4, 2),
     dict(affine=True, bias=False, activation="leaky_relu", negative_slope=0.2)),
    ("InstanceNorm2d", (2, 3, 5, 4), dict(track_running_stats=True, activation="silu")),
    ("InstanceNorm1d", (2, 3, 7), dict(affine=True, track_running_stats=True, activation="gelu")),
    ("InstanceNorm3d", (1, 3, 3, 4, 2), dict(affine=True, activation="gelu")),
]


@needs_onnx
@pytest.mark.parametrize("how", EXPORTERS + CAPTURED)
@pytest.mark.parametrize("name,shape,kwargs", LAYERS)
def test_layer_exports_to_standard_onnx(name, shape, kwargs, how, tmp_path, launches):
    """Eval mode: with running statistics (track_running_stats) they normalize the input."""
    torch.manual_seed(0)
    layer = _randomize(getattr(tin, name)(3, device=DEVICE, **kwargs)).eval()
    x = torch.randn(shape, device=DEVICE)
    (got,), op_types = _export(layer, (x,), how, tmp_path / "layer.onnx")
    before = launches("_fwd")  # the TorchScript exporter runs the model to trace it
    want = layer(x)
    assert launches("_fwd") == before + 1  # the reference is our kernel's output
    torch.testing.assert_close(got, want.cpu(), **TOL)
    norm = "BatchNormalization" if layer.track_running_stats else "InstanceNormalization"
    assert norm in op_types


@needs_onnx
@pytest.mark.parametrize("how", EXPORTERS)
def test_training_mode_exports_as_torch_does(how, tmp_path):
    """Each exporter treats a training-mode layer with running statistics as it treats torch's
    (TorchScript: eval, dynamo: the batch statistics), and exporting updates no statistics."""
    torch.manual_seed(0)
    ref = _randomize(nn.InstanceNorm2d(3, affine=True, track_running_stats=True, device=DEVICE))
    ours = tin.convert_instance_norm(copy.deepcopy(ref))
    stats = [t.clone() for t in ours.buffers()]
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    (got,), _ = _export(ours, (x,), how, tmp_path / "ours.onnx")
    (want,), _ = _export(ref, (x,), how, tmp_path / "torch.onnx")
    torch.testing.assert_close(got, want, **TOL)
    assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), stats))
    assert ours.training


@needs_onnx
@pytest.mark.parametrize("how", ["torchscript", "traced"])
def test_gelu_before_opset_20_uses_erf(how, tmp_path):
    torch.manual_seed(0)
    layer = tin.InstanceNorm2d(3, activation="gelu", device=DEVICE)
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    (got,), op_types = _export(layer, (x,), how, tmp_path / "gelu.onnx", opset_version=17)
    assert "Erf" in op_types and "Gelu" not in op_types
    torch.testing.assert_close(got, layer(x).cpu(), **TOL)


def _torch_net():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.LeakyReLU(0.2), nn.Conv2d(4, 3, 1), nn.InstanceNorm2d(3), nn.SiLU())


@needs_onnx
@pytest.mark.parametrize("how", EXPORTERS + CAPTURED)
def test_converted_model_exports(how, tmp_path, launches):
    torch.manual_seed(0)
    ref = _torch_net().to(DEVICE)
    _randomize(ref[1])
    ref.eval()
    model = tin.convert_instance_norm(copy.deepcopy(ref), fuse_activation=True)
    assert model[1].activation == "leaky_relu" and model[4].activation == "silu"
    x = torch.randn(2, 2, 6, 5, device=DEVICE)
    (got,), op_types = _export(model, (x,), how, tmp_path / "model.onnx")
    assert "LeakyRelu" in op_types
    torch.testing.assert_close(got, ref(x).cpu(), **TOL)
    before = launches("_fwd")
    torch.testing.assert_close(model(x), ref(x), **TOL)
    assert launches("_fwd") == before + 2


class _Adaptive(nn.Module):
    def forward(self, content, style, scale, shift):
        y = tin.adaptive_instance_norm(content, scale, shift, activation="leaky_relu",
                                       negative_slope=0.3)
        return y, tin.adain(content, style), tin.adaptive_instance_norm(content, shift, scale)


@needs_onnx
@pytest.mark.parametrize("how", EXPORTERS + CAPTURED)
def test_adaptive_forms_export(how, tmp_path, launches):
    """(N, C) scale with (1, C) shift and the reverse, and AdaIN (style statistics too)."""
    torch.manual_seed(0)
    args = (torch.randn(2, 3, 5, 4, device=DEVICE), torch.randn(2, 3, 4, 6, device=DEVICE) * 3 + 1,
            torch.randn(2, 3, device=DEVICE), torch.randn(1, 3, device=DEVICE))
    got, _ = _export(_Adaptive(), args, how, tmp_path / "adaptive.onnx")
    before = launches("_fwd")
    want = _Adaptive()(*args)
    assert launches("_fwd") == before + 4  # three forwards, the style statistics pass
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.cpu(), **TOL)


# --- importing the package leaves torch alone ---------------------------------------------------

_IMPORT_CHECK = """
import torch
import torch.onnx
from torch.onnx._internal.exporter import _decomp

builder = _decomp.create_onnx_friendly_decomposition_table
registry = dict(torch._decomp.decomposition_table)
import triton_instnorm

assert _decomp.create_onnx_friendly_decomposition_table is builder
assert torch._decomp.decomposition_table == registry
assert not any(op.namespace == "triton_instnorm" for op in registry)
"""


def test_import_leaves_torch_internals_alone():
    """Importing the package registers the TorchScript symbolics (public API) and nothing else:
    torch's private exporter functions and decomposition registry stay torch's own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@needs_onnx
def test_exported_program_without_the_table_names_it(tmp_path):
    """An ExportedProgram captured before the export holds our operators: without the table the
    dynamo exporter fails, and what it prints names the table."""
    layer = tin.InstanceNorm2d(3, device=DEVICE).eval()
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    ep = torch.export.export(layer, (x,))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(Exception,
                                                                      match="triton_instnorm"):
        warnings.simplefilter("always")
        torch.onnx.export(ep, (x,), str(tmp_path / "layer.onnx"), verbose=False)
    assert any("custom_translation_table=triton_instnorm.onnx_translation_table()"
               in str(w.message) for w in caught)


@needs_onnx
@pytest.mark.parametrize("how", EXPORTERS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_model_under_enabled_exports_as_torch(how, train, tmp_path):
    """torch's own model exported inside ``enabled()``: the same ONNX numbers as without."""
    torch.manual_seed(0)
    ref = _torch_net().to(DEVICE).train(train)
    _randomize(ref[1])
    x = torch.randn(2, 2, 6, 5, device=DEVICE)
    (want,), _ = _export(copy.deepcopy(ref), (x,), how, tmp_path / "torch.onnx")
    with tin.enabled():
        (got,), _ = _export(copy.deepcopy(ref), (x,), how, tmp_path / "enabled.onnx")
    torch.testing.assert_close(got, want, **TOL)


def test_translation_table_is_a_fresh_dict():
    table = tin.onnx_translation_table()
    assert set(table) == {OPS.forward.default, OPS.plane_stats.default}
    table.clear()
    assert tin.onnx_translation_table()
