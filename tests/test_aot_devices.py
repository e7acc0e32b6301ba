"""The cluster variants for sm_90 and sm_100, and the default ones for other GPUs (A100: sm_80,
MI300X: gfx942), compiled ahead of time without a GPU (perf/aot.py).

Each variant is planned for the GPU it is compiled for (``perf.aot_worker.planned_for``: the
launch code takes that GPU's decisions through ``TRITON_INSTNORM_EMULATE`` /
``TRITON_INSTNORM_CLUSTERS``).
The cluster variants (contiguous planes of 8193..65,536 elements held in 2..8 CTAs) must compile
to cluster kernels whose CTAs each load their own part of the plane once, 16 bytes per lane,
without spilling; they are skipped with the reason on a Triton older than 3.8, which cannot lower
them. The other GPUs' passes over 16-bit planes must load 16 bytes per lane too.
``pytest --runslow`` adds sweeps.
"""

import pytest

import _aot
from _aot import bwd, fwd, stats_bwd
from test_aot_compile import (BIG_TILE, CL_SPLIT, LOOPED, SPLIT, _compile, _failures, _slow_specs,
                              report, unreported)
from triton_instnorm import device
from triton_instnorm.kernels.constants import FROM_TILE

pytestmark = pytest.mark.perf  # a performance audit: the second test tier

CLUSTER_8 = (1, 2, 256, 256)  # 65,536 elements: 8 CTAs
CLUSTER_4 = (1, 2, 32768)  # 4 CTAs
CLUSTER_2 = (1, 2, 128, 128)  # 16,384: 2 CTAs


def _cluster_specs(gpu):
    """The cluster variants: (fast ones, the rest for --runslow)."""
    on = dict(device=gpu, clusters=True)
    fast = [
        fwd("bf16", CLUSTER_8, w="fp32", b="fp32", activation=2, **on),
        bwd("bf16", CLUSTER_8, w="fp32", b="fp32", activation=2, **on),
        fwd("fp32", CLUSTER_4, activation=4, **on),
        bwd("fp32", CLUSTER_4, activation=4, **on),
        fwd("fp16", CLUSTER_2, activation=1, **on),
        fwd("bf16", CLUSTER_8, use_input_stats=False, running="fp32", store_stats=False, **on),
        stats_bwd("bf16", CLUSTER_8, **on),
    ]
    rest = [
        bwd("fp16", CLUSTER_2, activation=3, **on),
        fwd("bf16", CLUSTER_8, w=None, b=None, write_y=False, **on),
        bwd("bf16", CLUSTER_2, use_input_stats=False, **on),
    ]
    return fast, rest


CLUSTER_FAST = _cluster_specs("h100")[0] + _cluster_specs("b200")[0][:2]
CLUSTER_SLOW = _cluster_specs("h100")[1] + sum(_cluster_specs("b200"), [])[2:]
needs_cluster_lowering = pytest.mark.skipif(
    device.triton_version() < device.FIRST_CLUSTER_TRITON,
    reason=f"Triton {device.triton.__version__} cannot lower cross-CTA reductions (the PlanCTA "
    "pass fails before 3.8): the launch code never asks it for clusters")
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
# What each launch of a cluster reads and writes along its planes: (loads, stores) of tiles.
PLANE_TILES = {"_fwd": (1, 1), "_bwd": (2, 1), "_stats_bwd": (1, 1)}


def _check_cluster_launch(r, spec):
    assert r["ok"], _failures([r])
    arch = {"h100": "sm_90", "b200": "sm_100"}[spec["device"]]
    assert r["ptx_target"].startswith(arch), r["ptx_target"]
    s = r["ptx_summary"]
    if r["kernel"] not in PLANE_TILES:  # the (N, C) reductions: one CTA, as without clusters
        assert r["num_ctas"] == 1 and s["cluster_ctas"] == [], r
        return
    ctas = r["num_ctas"]
    assert ctas > 1 and s["cluster_ctas"] == [ctas], (r["spec"], ctas, s["cluster_ctas"])
    source = r["constexprs"].get("STATS_FROM", r["constexprs"].get("SUMS_FROM"))
    reduces = source == str(FROM_TILE)
    if reduces:  # FROM_TILE: the plane's sums cross the CTAs through distributed shared memory
        assert s["ld_shared_cluster"] > 0 and s["barrier_cluster"] > 0, s
    # Each CTA loads its own 1 / ctas of the plane once, 16 bytes per lane: the x (and dy) tile
    # is not replicated across the cluster.
    block_hw = int(r["constexprs"]["BLOCK_HW"])
    lanes = 32 * r["num_warps"]
    per_lane = block_hw * ITEMSIZE[spec["dtype"]] // (16 * lanes * ctas)
    loads, stores = PLANE_TILES[r["kernel"]]
    writes = spec.get("write_y", True)
    assert s["ld_global_16B"] == loads * per_lane, (r["spec"], r["kernel"], s)
    assert s["st_global_16B"] == (stores * per_lane if writes else 0), (r["spec"], s)
    assert r["spill_stores"] == 0, (r["spec"], r["kernel"], r["registers"])


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """CLUSTER_FAST (with a Triton that lowers clusters) and OTHER_GPUS, in one compile."""
    lowers = device.triton_version() >= device.FIRST_CLUSTER_TRITON
    return _compile((CLUSTER_FAST if lowers else []) + OTHER_GPUS, tmp_path_factory,
                    "aot_devices")


@needs_cluster_lowering
@pytest.mark.parametrize("spec", CLUSTER_FAST, ids=_aot.spec_name)
def test_cluster_variants_compile(fast, spec):
    reports = fast["by_spec"][_aot.spec_name(spec)]
    assert any(r["num_ctas"] > 1 for r in reports), "no cluster launch planned"
    for r in reports:
        _check_cluster_launch(r, spec)


@needs_cluster_lowering
def test_cluster_kernels_for_every_cluster_gpu(fast):
    """Cluster kernels are compiled for each GPU with clusters (sm_90, sm_100), each with its
    ptxas figures read (registers within the cap, spill bytes)."""
    clustered = [r for r in fast["results"] if r["num_ctas"] > 1]
    assert {r["arch"] for r in clustered} == {device.EMULATED[g].arch for g in ("h100", "b200")}
    assert not unreported(clustered), report(fast, clustered)


# ------------------------------------------------------------ other GPUs: A100 and MI300X

# 16-bit variants whose tiles give every lane at least 8 elements (16 bytes): 1024-element planes
# one per program, the 8192-element tile, the streaming loop, split planes, channels_last groups.
WIDE_16BIT = [
    fwd("bf16", (2, 8, 32, 32), activation=2),
    bwd("fp16", (2, 8, 32, 32), activation=2),
    fwd("fp16", BIG_TILE),
    bwd("bf16", SPLIT),
    bwd("bf16", BIG_TILE, w="fp32", b="fp32"),
    fwd("bf16", LOOPED, activation=1),
    fwd("bf16", CL_SPLIT, layout="channels_last"),
]
OTHER_GPUS = ([dict(spec, device="mi300x") for spec in WIDE_16BIT[:4]]
              + [dict(spec, device="a100") for spec in WIDE_16BIT[:1]] + [
    # clusters asked for where there are none: the default paths
    fwd("bf16", CLUSTER_8, device="a100", clusters=True),
    fwd("bf16", CLUSTER_8, device="mi300x", clusters=True),
])
OTHER_GPUS_SLOW = ([dict(spec, device="mi300x") for spec in WIDE_16BIT[4:]]
                   + [dict(spec, device="a100") for spec in WIDE_16BIT[1:]])


@pytest.fixture(scope="module")
def other_gpus_slow(tmp_path_factory):
    return _compile(OTHER_GPUS_SLOW, tmp_path_factory, "aot_other_gpus_slow")


@pytest.mark.parametrize("spec", OTHER_GPUS, ids=_aot.spec_name)
def test_other_gpus_load_16_bytes(fast, spec):
    _check_other_gpu(fast, spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", OTHER_GPUS_SLOW, ids=_aot.spec_name)
def test_other_gpus_load_16_bytes_sweep(other_gpus_slow, spec):
    _check_other_gpu(other_gpus_slow, spec)


def _check_other_gpu(other_gpus, spec):
    """Every launch compiles for the GPU it was planned for, with one CTA per program; the passes
    over planes of 16-bit types load 16 bytes per lane (``ld.global.v4`` on sm_80; on gfx942
    ``global_load_dwordx4`` / ``buffer_load_dwordx4``), which 64-lane wavefronts get only when
    warps are counted in lanes."""
    gpu = device.EMULATED[spec["device"]]
    if gpu.arch in other_gpus["unavailable"]:
        pytest.skip(other_gpus["unavailable"][gpu.arch])
    reports = other_gpus["by_spec"][_aot.spec_name(spec)]
    assert reports
    for r in reports:
        assert r["ok"], _failures([r])
        assert r["arch"] == gpu.arch and r["num_ctas"] == 1
        if r["kernel"] not in ("_fwd", "_bwd", "_fwd_split_stats", "_bwd_split_sums"):
            continue
        if gpu.vendor == "amd":
            s = r["amdgcn_summary"]
            assert s["ld_x4"] > 0 and s["vgpr_spills"] == 0, (r["kernel"], s)
        else:
            assert r["ptx_target"] == gpu.arch, r["ptx_target"]
            assert r["ptx_summary"]["ld_global_v4"] > 0 and r["spill_stores"] == 0, r


@pytest.mark.slow
@pytest.mark.parametrize("gpu", ["a100", "b200", "mi300x"])
def test_sweep_compiles_for_other_gpus(tmp_path_factory, gpu):
    """The sweep planned for and compiled for each other GPU, clusters on where it has them."""
    specs = [dict(spec, device=gpu, clusters=True) for spec in _slow_specs()]
    out = _compile(specs, tmp_path_factory, f"aot_sweep_{gpu}")
    if device.EMULATED[gpu].arch in out["unavailable"]:
        pytest.skip(out["unavailable"][device.EMULATED[gpu].arch])
    bad = _failures(out["results"])
    assert not bad, f"Triton {out['triton']}: compile errors for {gpu}:\n{bad}"


@pytest.fixture(scope="module")
def clustered_slow(tmp_path_factory):
    return _compile(CLUSTER_SLOW, tmp_path_factory, "aot_clusters_slow")


@pytest.mark.slow
@needs_cluster_lowering
@pytest.mark.parametrize("spec", CLUSTER_SLOW, ids=_aot.spec_name)
def test_cluster_variants_compile_sweep(clustered_slow, spec):
    for r in clustered_slow["by_spec"][_aot.spec_name(spec)]:
        _check_cluster_launch(r, spec)
