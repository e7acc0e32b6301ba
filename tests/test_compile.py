"""torch.compile without graph breaks, torch.library.opcheck, and autocast behaviour."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE

import triton_instnorm as tin


def _models():
    torch.manual_seed(0)
    ours = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        tin.InstanceNorm2d(4, affine=True, track_running_stats=True, activation="leaky_relu"),
        torch.nn.Conv2d(4, 2, 1),
        tin.InstanceNorm2d(2),
    ).to(DEVICE)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        torch.nn.LeakyReLU(0.01),
        torch.nn.Conv2d(4, 2, 1),
        torch.nn.InstanceNorm2d(2),
    ).to(DEVICE)
    ref[0].load_state_dict(ours[0].state_dict())
    ref[1].load_state_dict(ours[1].state_dict())
    ref[3].load_state_dict(ours[2].state_dict())
    return ours, ref


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, launches):
    torch._dynamo.reset()
    ours, ref = _models()
    compiled = torch.compile(copy.deepcopy(ours), fullgraph=True, backend=backend)
    for step in range(2):
        x = torch.randn(2, 3, 6, 5, device=DEVICE) + step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, y_ref = compiled(x), ref(x)
        # dynamo warns about what it traces through in our code (a functools cache, say)
        assert not [w for w in caught if "triton_instnorm" in str(w.message)
                    or "triton_instnorm" in w.filename], [str(w.message) for w in caught]
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        y.square().sum().backward()
        y_ref.square().sum().backward()
    assert launches("_fwd") >= 4 and launches("_bwd") >= 4  # our kernels ran inside the graph
    mod = compiled._orig_mod
    # Running statistics still update under compile (the buffers are declared as mutated).
    torch.testing.assert_close(mod[1].running_mean, ref[1].running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod[1].running_var, ref[1].running_var, atol=1e-5, rtol=1e-5)
    for p, q in ((mod[1].weight, ref[1].weight), (mod[0].weight, ref[0].weight)):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


def test_compile_dynamic_shapes_channels_last(launches):
    """Dynamic shapes (symbolic sizes reach the fake implementations): layouts, values and the
    running statistics stay eager's."""
    torch._dynamo.reset()
    layer = tin.InstanceNorm2d(3, affine=True, track_running_stats=True, activation="relu")
    ref = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    compiled = torch.compile(layer.to(DEVICE), fullgraph=True, dynamic=True, backend="inductor")
    for shape in ((2, 3, 4, 5), (3, 3, 6, 5)):
        x = torch.randn(shape, device=DEVICE).to(memory_format=torch.channels_last)
        y = compiled(x)
        assert y.stride() == x.stride()
        torch.testing.assert_close(y, F.relu(ref.to(DEVICE)(x)), atol=1e-5, rtol=1e-5)
    assert launches("_fwd") >= 2
    torch.testing.assert_close(layer.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)


def test_compile_functional_eval_and_no_grad():
    torch._dynamo.reset()
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return tin.instance_norm(x, rm, rv, use_input_stats=False, activation="gelu")

    x = torch.randn(2, 3, 8, device=DEVICE)
    with torch.no_grad():
        want = F.gelu(F.instance_norm(x, rm, rv, use_input_stats=False))
        torch.testing.assert_close(f(x), want, atol=1e-5, rtol=1e-5)


def _op_samples():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rm = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    rv = torch.ones(3, dtype=torch.float64, device=DEVICE)
    return x, w, b, rm, rv


def test_opcheck_all_operators():
    ops = torch.ops.triton_instnorm
    x, w, b, rm, rv = _op_samples()
    torch.library.opcheck(ops.forward.default, (x, w, b, None, None, True, 1e-5, 2, 0.1))
    torch.library.opcheck(ops.forward.default, (x, w, b, rm, rv, False, 1e-5, 0, 0.01))
    y, stats = ops.forward(x.detach(), w, b, None, None, True, 1e-5, 0, 0.01)
    torch.library.opcheck(ops.update_running_stats.default, (stats, rm, rv, 2, 3, 20, 0.1))
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.backward.default,
                          (dy, x.detach(), w.detach(), b.detach(), stats, True, 1e-5, 0, 0.01, True,
                           True))
    torch.library.opcheck(ops.plane_stats.default, (x, 1e-5))


def test_autocast_same_output_dtype_as_torch():
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    amp = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    m = tin.InstanceNorm2d(3, affine=True).to(DEVICE)
    ref = torch.nn.InstanceNorm2d(3, affine=True).to(DEVICE)
    conv = torch.nn.Conv2d(3, 3, 1).to(DEVICE)
    x = torch.randn(2, 3, 5, 5, device=DEVICE)
    with torch.autocast(device_type, dtype=amp):
        h = conv(x)  # reduced precision activations, float32 parameters
        for inp in (x, h):
            got, want = m(inp), ref(inp)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_torch_export_eval_and_train():
    """torch.export traces the custom ops; the exported program matches eager and, in training
    mode, still updates the running statistics (declared mutated buffers)."""
    ours, _ = _models()
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    ours.eval()
    ep = torch.export.export(ours, (x,))
    torch.testing.assert_close(ep.module()(x), ours(x), atol=1e-6, rtol=1e-6)
    ours.train()
    ref = copy.deepcopy(ours)
    ep = torch.export.export(ours, (x,))
    exported = ep.module()
    torch.testing.assert_close(exported(x), ref(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(ref[1].running_mean, torch.zeros_like(ref[1].running_mean))
    torch.testing.assert_close(exported.get_buffer("1.running_mean"), ref[1].running_mean)
    torch.testing.assert_close(exported.get_buffer("1.running_var"), ref[1].running_var)
