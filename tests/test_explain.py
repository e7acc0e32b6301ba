"""``triton_instnorm.explain``: the launch plan printed, and its bytes equal to the traffic
audit's (perf/counting.py, the kernels run through Triton's interpreter) for every perf shape
class on every emulated GPU, on each path the planes can take."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_instnorm as tin  # noqa: E402
from perf import counting, machine, model, providers  # noqa: E402
from perf.shapes import SHAPE_CLASSES  # noqa: E402
from triton_instnorm import device, heuristics  # noqa: E402

GPUS = list(device.EMULATED)
PATHS = {  # the test hooks force the looped and split paths on the classes' tiny shapes
    "planned": contextlib.nullcontext,
    "looped": lambda: _hooks(tile_limit=32, split_planes=1 << 30),
    "split": lambda: _hooks(tile_limit=16, split_planes=48),
}


@contextlib.contextmanager
def _hooks(tile_limit, split_planes):
    with heuristics.tile_limit(tile_limit), heuristics.split_planes(split_planes):
        yield


def _smoke_cases():
    return [pytest.param(cls, shape, id=f"{cls.name}-{model.shape_to_str(shape)}")
            for cls in SHAPE_CLASSES.values() for shape in cls.smoke_shapes]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(device.EMULATE_ENV, raising=False)
    monkeypatch.delenv(device.CLUSTERS_ENV, raising=False)


def test_explain_prints_the_plan_without_a_kernel(launches):
    text = str(tin.explain(shape=(4, 32, 256, 256), dtype=torch.bfloat16, gpu="a100"))
    for expected in ("NVIDIA A100", "forward: split", "backward: split", "PROGRAMS_PER_SM",
                     "_fwd_split_stats", "_bwd_combine", "x the minimum"):
        assert expected in text, text
    eval_text = str(tin.explain(shape=(2, 8, 7, 7), training=False))
    assert "forward: elementwise" in eval_text and "backward" not in eval_text
    assert sum(launches(k) for k in ("_fwd", "_bwd", "_fwd_split_stats")) == 0


def test_explain_of_a_tensor_is_its_layout(monkeypatch):
    x = torch.empty(2, 16, 9, 9).to(memory_format=torch.channels_last)
    monkeypatch.setenv(device.EMULATE_ENV, "mi300x")
    e = tin.explain(x)
    assert e.gpu is device.EMULATED["mi300x"] and e.layout == "channels_last"
    assert e.plans["forward"].problem.rows_contiguous
    with pytest.raises(ValueError, match="v100"):
        tin.explain(x, gpu="v100")


def test_minimum_is_the_byte_models():
    for dtype in ("bfloat16", "float32"):
        e = tin.explain(shape=(2, 3, 10, 10), dtype=providers.TORCH_DTYPES[dtype])
        assert e.minimum == {d: model.norm_bytes((2, 3, 10, 10), dtype, d)
                             for d in ("forward", "backward")}


def _counted(shape, memory_format, dtype, gpu, path, provider=providers.OURS):
    """[(kernel, grid, bytes read, bytes written)] of a training step, (forward, backward),
    counted through the interpreter as perf/traffic.py counts them, and as explain plans them."""
    case = providers.make_case(shape, dtype, memory_format, torch.device("cpu"))
    fn, inputs = providers.norm_fn(provider, case)  # (sets TRITON_INSTNORM_CLUSTERS)
    with PATHS[path]():
        e = tin.explain(case.x, gpu=gpu)
        with counting.count() as fwd:
            y = fn(*inputs)
        with counting.count() as bwd:
            torch.autograd.grad(y, inputs, case.dy)
    counted = [[(lc.kernel, lc.grid[:len(step.grid)], lc.bytes_loaded, lc.bytes_stored)
                for lc, step in zip(t.launches, e.plans[d].passes)]
               for t, d in ((fwd, "forward"), (bwd, "backward"))]
    planned = [[(step.kernel, step.grid, read, written)
                for step, (_, read, written) in zip(e.plans[d].passes, e.bytes[d])]
               for d in ("forward", "backward")]
    kernels = [[lc.kernel for lc in t.launches] for t in (fwd, bwd)]
    return counted, planned, kernels, e


counted_here = pytest.mark.skipif(not machine.interpreting(),
                                  reason="counted through Triton's interpreter")


def _cases():
    """Every smoke shape of every class on every emulated GPU as planned; the looped and split
    paths (forced by the test hooks) on an H100 and an MI300X (64-lane wavefronts)."""
    return [pytest.param(*case.values, gpu, path, id=f"{case.id}-{gpu}-{path}")
            for case in _smoke_cases() for gpu in GPUS for path in PATHS
            if path == "planned" or gpu in ("h100", "mi300x")]


@pytest.mark.perf  # 88 training steps through the interpreter
@counted_here
@pytest.mark.parametrize("shape_class, shape, gpu, path", _cases())
def test_explain_bytes_are_the_traffic_audits(shape_class, shape, gpu, path, monkeypatch):
    monkeypatch.setenv(device.EMULATE_ENV, gpu)
    dtype = "bfloat16" if path != "looped" else "float32"
    counted, planned, kernels, e = _counted(shape, shape_class.memory_format, dtype, gpu, path)
    assert kernels == [[s.kernel for s in e.plans[d].passes] for d in ("forward", "backward")]
    assert counted == planned, str(e)


FLAGS = {  # explain's arguments, and the call that runs them
    "eval": (dict(training=False), dict(use_input_stats=False)),
    "residual_gelu": (dict(residual=True, activation="gelu"), dict(activation="gelu")),
    "no_affine_silu": (dict(affine=False, activation="silu"), dict(activation="silu")),
}


@counted_here
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("flags", FLAGS)
def test_explain_bytes_follow_the_flags(flags, path):
    """Running statistics, a residual read again by the backward under an activation, no
    parameters: the bytes still those the kernels move."""
    explained, call = FLAGS[flags]
    shape = (2, 3, 10, 10)
    x = torch.randn(shape, requires_grad=True)
    affine = explained.get("affine", True)
    w, b = (torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)) if affine \
        else (None, None)
    r = torch.randn(shape, requires_grad=True) if explained.get("residual") else None
    running = (torch.randn(3), torch.rand(3) + 0.5) if not explained.get("training", True) \
        else (None, None)
    with PATHS[path]():
        e = tin.explain(x, **explained)
        with counting.count() as fwd:
            y = tin.instance_norm(x, *running, weight=w, bias=b, residual=r, **call)
        counted = [fwd]
        if "backward" in e.plans:
            with counting.count() as bwd:
                torch.autograd.grad(y, [t for t in (x, w, b, r) if t is not None],
                                    torch.randn_like(y))
            counted.append(bwd)
    for t, (direction, plan) in zip(counted, e.plans.items(), strict=True):
        assert [(lc.kernel, lc.bytes_loaded, lc.bytes_stored) for lc in t.launches] == \
            e.bytes[direction], str(e)


@counted_here
@pytest.mark.skipif(not device.clusters_supported(device.EMULATED["h100"], real=False),
                    reason="this Triton lowers no cluster reduction")
def test_explain_bytes_of_a_cluster(monkeypatch):
    counted, planned, _, e = _counted((1, 2, 128, 128), "contiguous", "bfloat16", "h100",
                                      "planned", providers.CLUSTERS)
    monkeypatch.delenv(device.CLUSTERS_ENV, raising=False)
    assert e.plans["forward"].path == "cluster" and counted == planned, str(e)


def test_plans_list_every_pass_and_buffer():
    """The plan is one value: the passes and buffers of each path, compared without a launch."""
    h, bf16 = heuristics, torch.bfloat16

    def plan(shape, direction="forward", **kw):
        return tin.explain(shape=shape, dtype=bf16, gpu="h100", **kw).plans[direction]

    def passes(p):
        return [(s.kernel, s.grid) for s in p.passes]

    def buffers(p):
        return {b.name: b.shape or b.like for b in p.buffers}

    # 4 planes of 2^20: 86 chunks of 3 loop tiles for 2 x 132 programs, and for the statistics
    # pass 128 chunks of one 8192 tile
    split = plan((1, 4, 1024, 1024))
    assert split.path == "split" and split.chunks == 86
    assert passes(split) == [("_fwd_split_stats", (4, 128)), ("_fwd_combine", (1,)),
                             ("_fwd", (4, 86))]
    assert buffers(split) == {"y": "x", "Stats": (4, 1, 4), "Partials": (3, 4, 128)}
    assert split.passes[2].options["STATS_FROM"] == h.FROM_PARTIALS
    looped = plan((1, 512, 128, 128), "backward")  # enough planes: streamed, not split
    assert looped.path == "looped" and looped.passes[0].options["SUMS_FROM"] == h.FROM_LOOP
    assert passes(looped) == [("_bwd", (512, 1)), ("_sum_partials_over_n", (1,))]
    assert buffers(looped) == {"dx": "x", "PlaneSums": (2, 512), "DW": "w", "DB": "b"}
    tile = plan((64, 64, 7, 7), "backward", affine=False)  # no dweight / dbias to reduce
    assert tile.path == "single tile" and passes(tile) == [("_bwd", (512, 1))]
    assert tile.passes[0].options["BLOCK_R"] == 8  # 4096 planes share 2 x 132 SMs' programs
    assert plan((8, 64, 7, 7)) == plan((8, 64, 7, 7)) and str(split)
