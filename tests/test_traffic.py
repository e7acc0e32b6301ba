"""Bytes loaded and stored, and programs launched, by every kernel path (perf/counting.py).

Counted through Triton's interpreter, unmasked lanes only, so the numbers are exact. What is
pinned, from perf/NOTES.md:

- single tile (a plane fits one tile): the forward reads x once and writes y once; the backward
  reads x and dy once and writes dx once;
- looped path (longer planes): a statistics sweep, then a normalize sweep: x read twice (x and dy
  twice in the backward), the output written once;
- split path (planes split across programs): the same two sweeps, in two launches, with a
  combine pass between them that reads each chunk's partial sums once (O(chunks) bytes per
  plane, not O(chunks^2));
- the forward also loads one element of x per plane (per chunk when split): the pivot of the
  shifted sums;
- channels_last moves the same bytes as contiguous; padding lanes (planes or row blocks that
  are not a power of two) are never loaded; the statistics and parameters cost O(N*C) bytes,
  the same whatever the plane size.

Expected counts are written as numel x itemsize x sweeps: a change that adds a pass over the
data fails here. The shape-class table at the end records today's launch configuration of the
perf classes at full size (grids without running the kernels) and their bytes / minimum.
"""

import contextlib
import math
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch
from utils import make_inputs, randn_like

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_instnorm as tin  # noqa: E402
from perf import counting, machine, model, providers, summary, traffic  # noqa: E402
from perf.shapes import SHAPE_CLASSES  # noqa: E402
from triton_instnorm import device, heuristics  # noqa: E402
from triton_instnorm.kernels import constants  # noqa: E402

pytestmark = [pytest.mark.perf,  # a performance audit: the second test tier
              pytest.mark.skipif(not machine.interpreting(),
                                 reason="traffic is counted through Triton's interpreter only")]


@pytest.fixture(autouse=True)
def _h100(monkeypatch):
    """The pins below are an H100's launch decisions, cluster launches off unless a test asks."""
    monkeypatch.setenv(device.EMULATE_ENV, "h100")
    monkeypatch.delenv(device.CLUSTERS_ENV, raising=False)

PIVOT = 1  # elements of x the forward loads per plane (per chunk and launch when split) as pivot
SINGLE_TILE_SWEEPS = 1  # reads of x (and dy) when a plane stays in registers
LOOPED_SWEEPS = 2  # statistics (or c1, c2) sweep, then the normalize (or dx) sweep
STATS_BUDGET = 64  # bytes per plane the statistics and parameters may move, at most
LOOP_TILE = 32  # tile_limit that forces the looped path on the small planes below
SPLIT_TILE, SPLIT_CHUNK_LEN = 16, 48  # tiles of 16 elements, chunks of 48: planes split in chunks


@contextlib.contextmanager
def _looped():
    """Tiles of LOOP_TILE elements, one chunk per plane (no split, whatever the layout)."""
    with heuristics.tile_limit(LOOP_TILE), heuristics.split_planes(1 << 30):
        yield


@contextlib.contextmanager
def _split():
    with heuristics.tile_limit(SPLIT_TILE), heuristics.split_planes(SPLIT_CHUNK_LEN):
        yield


PATHS = {"single_tile": contextlib.nullcontext, "looped": _looped,
         "split": _split}


def _inputs(shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    """x, weight, bias (leaves) and dy, on the CPU: the interpreter's loads and stores are
    attributed to tensors by address, which host copies of GPU tensors would not match."""
    x, w, b = make_inputs(shape, dtype, memory_format=memory_format, requires_grad=True,
                          device="cpu")
    return x, w, b, randn_like(x, seed=1)


def _count(x, w, b, dy, path="single_tile", programs="all"):
    """(forward Traffic, backward Traffic, y, dx) of one training step on ``path``."""
    with PATHS[path]():
        with counting.count(programs) as fwd:
            y = tin.instance_norm(x, weight=w, bias=b)
        with counting.count(programs) as bwd:
            dx, _, _ = torch.autograd.grad(y, (x, w, b), dy)
    return fwd, bwd, y, dx


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _planes(t) -> int:
    return t.shape[0] * t.shape[1]


def _chunks(counted) -> int:
    return max(launch.grid[1] for launch in counted.launches)


def _tensor_traffic(fwd, bwd, x, y, dy, dx) -> dict:
    """Bytes each direction moves from and to x, y, dy and dx."""
    return {"forward loads x": fwd.loaded(x), "forward stores y": fwd.stored(y),
            "backward loads x": bwd.loaded(x), "backward loads dy": bwd.loaded(dy),
            "backward stores dx": bwd.stored(dx),
            "stores into x or dy": fwd.stored(x) + bwd.stored(x) + bwd.stored(dy)}


def _expected(x, sweeps: int, pivots_per_plane: int) -> dict:
    """x (and dy) read ``sweeps`` times, the forward's pivots on top; y and dx written once."""
    tensor = _nbytes(x)
    return {"forward loads x": sweeps * tensor + pivots_per_plane * _planes(x) * x.element_size(),
            "forward stores y": tensor, "backward loads x": sweeps * tensor,
            "backward loads dy": sweeps * tensor, "backward stores dx": tensor,
            "stores into x or dy": 0}


# Shapes whose planes and row blocks are not powers of two: padding lanes would show up.
SMALL_SHAPES = {"hw100": (2, 3, 10, 10), "hw49_rows20": (4, 5, 7, 7), "3d_hw125": (1, 3, 5, 5, 5)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SMALL_SHAPES.values(), ids=SMALL_SHAPES.keys())
def test_single_tile_reads_each_element_once(shape, dtype):
    x, w, b, dy = _inputs(shape, dtype)
    fwd, bwd, y, dx = _count(x, w, b, dy)
    assert _chunks(fwd) == 1, fwd.table()
    assert _tensor_traffic(fwd, bwd, x, y, dy, dx) == _expected(x, SINGLE_TILE_SWEEPS, PIVOT)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_looped_path_reads_twice(dtype):
    x, w, b, dy = _inputs(SMALL_SHAPES["hw100"], dtype)  # 100 = 3 full tiles of 32 + 4 lanes
    fwd, bwd, y, dx = _count(x, w, b, dy, "looped")
    assert _chunks(fwd) == 1, fwd.table()
    assert _tensor_traffic(fwd, bwd, x, y, dy, dx) == _expected(x, LOOPED_SWEEPS, PIVOT)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_split_path_reads_twice_in_two_launches(dtype):
    shape = (2, 3, 100)
    x, w, b, dy = _inputs(shape, dtype)
    fwd, bwd, y, dx = _count(x, w, b, dy, "split")
    chunks = math.ceil(shape[-1] / SPLIT_CHUNK_LEN)
    assert _chunks(fwd) == _chunks(bwd) == chunks, fwd.table()
    pivots = chunks * PIVOT  # the partial-sums pass; the normalize pass reads the saved pivot
    assert _tensor_traffic(fwd, bwd, x, y, dy, dx) == _expected(x, LOOPED_SWEEPS, pivots)


@contextlib.contextmanager
def _tile_starts(t):
    """The element offset in ``t`` of each block load from ``t`` (more than one lane), in order."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_masked_load
    base, size = t.data_ptr(), _nbytes(t)
    starts = []

    def load(ptrs, mask, *rest):
        addresses = np.asarray(ptrs.data)
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
        inside = addresses[(addresses >= base) & (addresses < base + size)]
        if inside.size > 1:
            starts.append((int(inside.min()) - base) // t.element_size())
        return original(ptrs, mask, *rest)

    builder.create_masked_load = load
    try:
        yield starts
    finally:
        del builder.create_masked_load  # the class's method shows through again


def test_looped_second_sweep_runs_backwards():
    """A plane streamed twice by its program: the normalize (dx) sweep starts with the tile the
    statistics (sums) sweep read last, the likeliest still in L2."""
    x, w, b, dy = _inputs((1, 1, 100))  # tiles at 0, 32, 64 and 96
    sweeps = [0, 32, 64, 96, 96, 64, 32, 0]
    with _looped(), _tile_starts(x) as forward:
        y = tin.instance_norm(x, weight=w, bias=b)
    with _looped(), _tile_starts(x) as backward:
        torch.autograd.grad(y, (x, w, b), dy)
    assert forward == backward == sweeps


EVAL_SPLIT = {  # planes the heuristics split; before each chunk's program normalized its plane
    "small": ((2, 3, 100), _split),  # 3 chunks
    "huge_planes": ((1, 4, 1024, 1024), contextlib.nullcontext),  # 86 chunks
    "channels_last": ((4, 32, 64, 64), contextlib.nullcontext),  # 16-byte channel vectors, split
}


@pytest.mark.parametrize("case", EVAL_SPLIT, ids=EVAL_SPLIT.keys())
def test_eval_on_split_planes_writes_each_element_once(case):
    """Given running statistics the forward is elementwise: on planes the heuristics split, each
    chunk's program normalizes its chunk only, so x is read once and y written once."""
    shape, path = EVAL_SPLIT[case]
    fmt = torch.channels_last if case == "channels_last" else torch.contiguous_format
    x, w, b, _ = _inputs(shape, torch.bfloat16, memory_format=fmt)
    running = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    with torch.no_grad(), path(), counting.count("all" if case == "small" else "sample") as fwd:
        y = tin.instance_norm(x, *running, weight=w, bias=b, use_input_stats=False)
    assert [launch.kernel for launch in fwd.launches] == ["_fwd"]
    assert _chunks(fwd) > 1, fwd.table()
    assert (fwd.loaded(x), fwd.stored(y)) == (_nbytes(x), _nbytes(y))


# Bytes per plane each more chunk may add: its partial sums written and read once, and each of
# its programs reading the plane's statistics and parameters (float32: 48 forward, 72 backward).
CHUNK_BUDGET = 80


def test_split_partials_grow_linearly_with_chunks():
    """Each chunk's partial sums are read once, by the combine pass: going from 4 to 16 chunks
    adds at most CHUNK_BUDGET bytes per plane per chunk (a normalize pass re-reading every
    chunk's partials would add 240 forward and 160 backward here)."""
    others = {}
    for chunks in (4, 16):
        x, w, b, dy = _inputs((2, 3, SPLIT_TILE * chunks))
        with heuristics.tile_limit(SPLIT_TILE), heuristics.split_planes(SPLIT_TILE):
            fwd, bwd, y, dx = _count(x, w, b, dy)
        assert _chunks(fwd) == _chunks(bwd) == chunks, fwd.table()
        others[chunks] = _other_bytes(fwd, bwd, x, y, dy, dx)
    for direction in range(2):
        added = others[16][direction] - others[4][direction]
        assert 0 < added <= CHUNK_BUDGET * (16 - 4) * _planes(x), (direction, others)


def _other_bytes(fwd, bwd, x, y, dy, dx):
    """(forward, backward) bytes moved other than from and to x, y, dy and dx."""
    return (fwd.moved() - fwd.moved(x) - fwd.moved(y),
            bwd.moved() - bwd.moved(x) - bwd.moved(dy) - bwd.moved(dx))


@pytest.mark.parametrize("path", ["single_tile", "looped"])
def test_channels_last_moves_the_same_bytes_as_contiguous(path):
    shape = (2, 4, 9, 9)
    counts = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        x, w, b, dy = _inputs(shape, memory_format=fmt)
        fwd, bwd, y, dx = _count(x, w, b, dy, path)
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
        counts[fmt] = {**_tensor_traffic(fwd, bwd, x, y, dy, dx),
                       "forward, all bytes": fwd.moved(), "backward, all bytes": bwd.moved()}
    assert counts[torch.channels_last] == counts[torch.contiguous_format]


@pytest.mark.parametrize("path", ["single_tile", "looped"])
def test_statistics_traffic_is_per_plane(path):
    """Bytes other than x, y, dy, dx: the same for planes of 49 and of 100 elements (O(N*C),
    independent of the plane size), and at most STATS_BUDGET per plane."""
    others = []
    for shape in ((2, 3, 7, 7), (2, 3, 10, 10)):
        x, w, b, dy = _inputs(shape)
        fwd, bwd, y, dx = _count(x, w, b, dy, path)
        other = _other_bytes(fwd, bwd, x, y, dy, dx)
        assert max(other) <= STATS_BUDGET * _planes(x)
        others.append(other)
    assert others[0] == others[1]


SAMPLED = {  # launches of more than three programs per axis, interior programs alike
    "single_tile": ((8, 40, 7, 7), torch.contiguous_format),
    "looped": ((2, 8, 10, 10), torch.contiguous_format),
    "split": ((2, 2, 200), torch.contiguous_format),
    "channels_last": ((5, 32, 5, 5), torch.channels_last),
}


@pytest.mark.parametrize("case", SAMPLED, ids=SAMPLED.keys())
def test_sampled_programs_count_what_all_programs_count(case):
    shape, fmt = SAMPLED[case]
    path = case if case in PATHS else "single_tile"
    counts = {}
    for programs in ("all", "sample", "none"):
        fwd, bwd, _, _ = _count(*_inputs(shape, memory_format=fmt), path=path, programs=programs)
        launches = fwd.launches + bwd.launches
        counts[programs] = [(lc.kernel, lc.grid, lc.bytes_loaded, lc.bytes_stored)
                            for lc in launches]
        ran = sum(lc.programs_run for lc in launches)
        total = sum(lc.programs for lc in launches)
        assert {"all": ran == total, "sample": ran < total, "none": ran == 0}[programs]
    assert counts["sample"] == counts["all"]
    assert [c[:2] for c in counts["none"]] == [c[:2] for c in counts["all"]]
    assert all(c[2:] == (0, 0) for c in counts["none"])


def test_report_table_and_section(tmp_path):
    out = tmp_path / "traffic.md"
    traffic.main(["--smoke", "--classes", "gan_2d", "--dtypes", "bfloat16", "--out", str(out)])
    text = out.read_text()
    assert "| 1x4x32x32 | bfloat16 | forward | _fwd 4 | 0.03 | 1.00 |" in text
    assert "## Memory traffic" in summary.traffic_section(str(out))


# ------------------------------------------------------------------ perf shape classes, full size

TARGET = 2 * device.EMULATED["h100"].sms  # 264: two programs per SM of the emulated H100
SAMPLE_BUDGET = 1 << 19  # elements a sampled count may sweep by default (more: --runslow)


class Entry(NamedTuple):
    shape_class: str
    shape: tuple
    programs: tuple  # (forward, backward): programs of the largest launch
    ratio: tuple  # (forward, backward): bytes moved / minimum (perf/model.py), bfloat16
    below_target: Optional[str] = None  # why it has < TARGET programs and fewer than its twin


# Today's launch configuration. Update a line when a launch change makes its test fail; remove
# ``below_target`` when an entry reaches TARGET programs (or its contiguous twin's count).
SHAPE_TABLE = [
    Entry("style_transfer_2d", (4, 32, 256, 256), (1024, 512), (1.50, 1.67)),
    Entry("style_transfer_2d", (4, 64, 128, 128), (512, 512), (1.50, 1.67)),
    Entry("style_transfer_2d", (4, 128, 64, 64), (512, 512), (1.00, 1.00)),
    Entry("gan_2d", (1, 64, 256, 256), (512, 384), (1.50, 1.67)),
    Entry("gan_2d", (16, 256, 64, 64), (4096, 4096), (1.00, 1.00)),
    Entry("nnunet_3d", (2, 32, 128, 128, 128), (16384, 384), (1.50, 1.67)),
    Entry("nnunet_3d", (2, 320, 8, 8, 8), (320, 320), (1.00, 1.01)),
    Entry("nnunet_3d", (2, 64, 64, 64, 64), (4096, 512), (1.50, 1.67)),
    Entry("tiny_planes", (64, 2048, 7, 7), (8192, 8192), (1.03, 1.06)),
    Entry("tiny_planes", (256, 512, 4, 4), (2048, 2048), (1.07, 1.18)),
    Entry("huge_planes", (1, 4, 1024, 1024), (512, 344), (1.50, 1.67)),
    Entry("huge_planes", (1, 1, 2048, 2048), (512, 342), (1.50, 1.67)),
    # channels_last: 16-byte channel vectors (8 bf16 channels), spatial positions split across
    # programs; the bytes above the contiguous twin's are the chunks' partial sums.
    Entry("style_transfer_2d_channels_last", (4, 32, 256, 256), (1024, 304), (1.51, 1.67)),
    Entry("style_transfer_2d_channels_last", (4, 64, 128, 128), (512, 352), (1.51, 1.67)),
    Entry("style_transfer_2d_channels_last", (4, 128, 64, 64), (512, 512), (1.52, 1.69)),
    Entry("nnunet_3d_channels_last", (2, 32, 128, 128, 128), (272, 272), (1.50, 1.67)),
    Entry("nnunet_3d_channels_last", (2, 320, 8, 8, 8), (320, 320), (1.00, 1.01)),
    Entry("nnunet_3d_channels_last", (2, 64, 64, 64, 64), (288, 288), (1.50, 1.67)),
    Entry("plane_sweep", (1, 262144, 64), (16384, 16384), (1.01, 1.04)),
    Entry("plane_sweep", (1, 131072, 128), (16384, 16384), (1.00, 1.02)),
    Entry("plane_sweep", (1, 65536, 256), (16384, 16384), (1.00, 1.01)),
    Entry("plane_sweep", (1, 32768, 512), (16384, 16384), (1.00, 1.01)),
    Entry("plane_sweep", (1, 16384, 1024), (16384, 16384), (1.00, 1.00)),
    Entry("plane_sweep", (1, 8192, 2048), (8192, 8192), (1.00, 1.00)),
    Entry("plane_sweep", (1, 4096, 4096), (4096, 4096), (1.00, 1.00)),
    Entry("plane_sweep", (1, 2048, 8192), (2048, 2048), (1.00, 1.00)),
    Entry("plane_sweep", (1, 1024, 16384), (1024, 1024), (1.50, 1.67)),
    Entry("plane_sweep", (1, 512, 32768), (512, 512), (1.50, 1.67)),
    Entry("plane_sweep", (1, 256, 65536), (2048, 512), (1.50, 1.67)),
    Entry("plane_sweep", (1, 128, 131072), (2048, 512), (1.50, 1.67)),
    Entry("plane_sweep", (1, 64, 262144), (2048, 384), (1.50, 1.67)),
    Entry("plane_sweep", (1, 32, 524288), (2048, 320), (1.50, 1.67)),
    Entry("plane_sweep", (1, 16, 1048576), (2048, 288), (1.50, 1.67)),
    Entry("plane_sweep", (1, 8, 2097152), (2048, 280), (1.50, 1.67)),
    Entry("plane_sweep", (1, 4, 4194304), (2048, 276), (1.50, 1.67)),
]


def _entry_id(e):
    return f"{e.shape_class}-{model.shape_to_str(e.shape)}"


def _full_size(entry, dtype=torch.bfloat16, zeros=False):
    """x, w, b, dy at full size: uninitialized (nothing is read when no program runs) or zeros
    (no plane triggers the overflow rescan, which random data does not either)."""
    fmt = providers.TORCH_MEMORY_FORMATS[SHAPE_CLASSES[entry.shape_class].memory_format]
    x, dy = (torch.empty(entry.shape, dtype=dtype, memory_format=fmt) for _ in range(2))
    if zeros:
        x.zero_(), dy.zero_()
    w, b = torch.ones(entry.shape[1], dtype=dtype), torch.zeros(entry.shape[1], dtype=dtype)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), dy


def _largest(plan) -> int:
    return max(step.programs for step in plan.passes)


def _plans(entry):
    """The (forward, backward) plans of a training step at full size: nothing is launched."""
    e = tin.explain(_full_size(entry)[0])
    return e.plans["forward"], e.plans["backward"]


def test_byte_model_counts_the_statistics_the_kernels_store():
    """perf/model.py cannot import the kernels (it is loaded before TRITON_INTERPRET is set), so
    its count of statistics per plane is a literal: it must stay the kernels' NUM_STATS."""
    assert model.STATS_PER_PLANE == constants.NUM_STATS


def test_table_covers_every_shape_class():
    listed = {(e.shape_class, e.shape) for e in SHAPE_TABLE}
    wanted = {(c.name, s) for c in SHAPE_CLASSES.values() for s in c.shapes}
    assert listed == wanted


@pytest.mark.parametrize("entry", SHAPE_TABLE, ids=_entry_id)
def test_programs_per_launch(entry):
    fwd, bwd = _plans(entry)
    assert (_largest(fwd), _largest(bwd)) == entry.programs, (str(fwd), str(bwd))


@pytest.mark.parametrize("entry", SHAPE_TABLE, ids=_entry_id)
def test_explained_bytes_over_minimum(entry):
    """explain's bytes (tests/test_explain.py ties them to the counts) at full size, every entry:
    the ratios the sampled counts below pin where they fit the budget."""
    e = tin.explain(_full_size(entry)[0])
    ratios = tuple(round(sum(r + w for _, r, w in e.bytes[d]) / e.minimum[d], 2)
                   for d in ("forward", "backward"))
    assert ratios == entry.ratio


@pytest.mark.parametrize("entry", SHAPE_TABLE, ids=_entry_id)
def test_bytes_over_minimum(entry, request):
    top = max(_plans(entry)[0].passes, key=lambda step: step.programs)
    sampled = math.prod(min(g, 3) for g in top.grid)
    if sampled * math.prod(entry.shape) / top.programs > SAMPLE_BUDGET:
        if not request.config.getoption("--runslow"):
            pytest.skip("sampled programs sweep more than SAMPLE_BUDGET elements: pass --runslow")
    fwd, bwd, _, _ = _count(*_full_size(entry, zeros=True), programs="sample")
    ratios = tuple(round(t.moved() / model.norm_bytes(entry.shape, "bfloat16", d), 2)
                   for t, d in ((fwd, "forward"), (bwd, "backward")))
    assert ratios == entry.ratio


def _twin(entry):
    """The contiguous class's entry for the same shape, for a channels_last class."""
    name = entry.shape_class.replace("_channels_last", "")
    return next((e for e in SHAPE_TABLE if e.shape_class == name and e.shape == entry.shape
                 and name != entry.shape_class), None)


@pytest.mark.parametrize("entry", [
    pytest.param(e, id=_entry_id(e), marks=[pytest.mark.xfail(strict=True, reason=e.below_target)]
                 if e.below_target else []) for e in SHAPE_TABLE])
def test_occupancy_target(entry):
    """At least TARGET programs, or for a channels_last class as many as its contiguous twin."""
    programs = _largest(_plans(entry)[0])
    twin = _twin(entry)
    assert programs >= TARGET or (twin is not None and programs >= _largest(_plans(twin)[0]))


# ------------------------------------------------------------- the same classes, clusters on

class ClusterEntry(NamedTuple):
    shape_class: str
    shape: tuple
    programs: int  # programs of the largest launch, forward and backward
    ctas: int  # CTAs per program: the cluster holding a plane
    ratio: tuple  # (forward, backward): bytes moved / minimum, bfloat16


# With TRITON_INSTNORM_CLUSTERS=1 (Triton >= 3.8, an sm_90+ GPU) every contiguous plane of
# 8193..65,536 elements is held in a cluster and x (and dy) read once, in one launch per pass.
# Every other entry of SHAPE_TABLE keeps its launches (test_clusters_change_nothing_else).
CLUSTER_TABLE = [
    ClusterEntry("style_transfer_2d", (4, 32, 256, 256), 128, 8, (1.00, 1.00)),
    ClusterEntry("style_transfer_2d", (4, 64, 128, 128), 256, 2, (1.00, 1.00)),
    ClusterEntry("gan_2d", (1, 64, 256, 256), 64, 8, (1.00, 1.00)),
    ClusterEntry("nnunet_3d", (2, 32, 32, 32, 32), 64, 4, (1.00, 1.00)),  # nnU-Net's 32^3 stage
    ClusterEntry("plane_sweep", (1, 1024, 16384), 1024, 2, (1.00, 1.00)),
    ClusterEntry("plane_sweep", (1, 512, 32768), 512, 4, (1.00, 1.00)),
    ClusterEntry("plane_sweep", (1, 256, 65536), 256, 8, (1.00, 1.00)),
]
needs_cluster_lowering = pytest.mark.skipif(
    device.triton_version() < device.FIRST_CLUSTER_TRITON,
    reason=f"Triton {device.triton.__version__} cannot lower cluster reductions: no GPU takes "
    "the cluster launches with it")


@pytest.fixture
def clusters(monkeypatch):
    monkeypatch.setenv(device.CLUSTERS_ENV, "1")


def _launch_shapes(entry):
    fwd, bwd = _plans(entry)
    return [(s.kernel, s.grid, s.options.get("num_ctas", 1)) for s in fwd.passes + bwd.passes]


@needs_cluster_lowering
@pytest.mark.parametrize("entry", CLUSTER_TABLE, ids=_entry_id)
def test_cluster_reads_once(entry, clusters):
    x, w, b, dy = _full_size(entry, zeros=True)
    fwd, bwd, y, dx = _count(x, w, b, dy, programs="sample")
    for counted, kernel in ((fwd, "_fwd"), (bwd, "_bwd")):
        assert [(lc.kernel, lc.programs, lc.ctas) for lc in counted.launches
                if lc.kernel == kernel] == [(kernel, entry.programs, entry.ctas)]
    assert "_fwd_split_stats" not in fwd.kernels() and "_bwd_split_sums" not in bwd.kernels()
    reads = [round(t.loaded(v) / _nbytes(v), 2) for t, v in ((fwd, x), (bwd, x), (bwd, dy))]
    assert reads == [1.00, 1.00, 1.00]
    ratios = tuple(round(t.moved() / model.norm_bytes(entry.shape, "bfloat16", d), 2)
                   for t, d in ((fwd, "forward"), (bwd, "backward")))
    assert ratios == entry.ratio


@needs_cluster_lowering
def test_clusters_change_nothing_else(monkeypatch):
    """Clusters on: the entries of SHAPE_TABLE that are not in CLUSTER_TABLE keep their launches
    (channels_last, planes <= 8192 or > 65,536 elements); those in it change."""
    clustered = {(e.shape_class, e.shape) for e in CLUSTER_TABLE}
    for entry in SHAPE_TABLE:
        monkeypatch.delenv(device.CLUSTERS_ENV, raising=False)
        off = _launch_shapes(entry)
        monkeypatch.setenv(device.CLUSTERS_ENV, "1")
        on = _launch_shapes(entry)
        assert (on != off) == ((entry.shape_class, entry.shape) in clustered), (entry, on, off)
