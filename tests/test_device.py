"""The device description (triton_instnorm/device.py) and the decisions that depend on it."""

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton

import triton_instnorm
from triton_instnorm import device, heuristics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(device.EMULATE_ENV, raising=False)
    monkeypatch.delenv(device.CLUSTERS_ENV, raising=False)


def test_emulated_gpus():
    e = device.EMULATED
    assert (e["h100"].sms, e["h100"].capability, e["h100"].warp_size) == (132, (9, 0), 32)
    assert (e["h200"].sms, e["b200"].sms, e["a100"].sms, e["mi300x"].sms) == (132, 148, 108, 304)
    assert e["mi300x"].warp_size == 64 and e["mi300x"].arch == "gfx942"
    assert [name for name, gpu in e.items() if gpu.clusters] == ["h100", "h200", "b200"]


def test_emulation_follows_the_variable(monkeypatch, no_env):
    cpu = torch.device("cpu")
    assert device.describe(cpu) is device.EMULATED["h100"]
    monkeypatch.setenv(device.EMULATE_ENV, "MI300X")
    assert device.describe(cpu) is device.EMULATED["mi300x"]
    monkeypatch.setenv(device.EMULATE_ENV, "v100")
    with pytest.raises(ValueError, match="TRITON_INSTNORM_EMULATE='v100': expected one of h100"):
        device.describe(cpu)


@pytest.mark.parametrize("hip", [None, "6.2"])
def test_cuda_properties(monkeypatch, hip):
    """Read from torch.cuda.get_device_properties, once per device; an AMD GPU's (9, 4) is no
    Hopper."""
    props = SimpleNamespace(name="GPU", major=9, minor=4 if hip else 0, multi_processor_count=99,
                            warp_size=64 if hip else 32, L2_cache_size=1 << 22,
                            shared_memory_per_block_optin=1 << 16,
                            gcnArchName="gfx942:sramecc+:xnack-")
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: calls.append(i) or props)
    monkeypatch.setattr(torch.version, "hip", hip)
    device._cuda_device.cache_clear()
    try:
        gpu = device._cuda_device(3)
        assert device._cuda_device(3) is gpu and calls == [3]
    finally:
        device._cuda_device.cache_clear()
    assert (gpu.sms, gpu.warp_size, gpu.l2_bytes, gpu.shared_bytes) == (99, props.warp_size,
                                                                         1 << 22, 1 << 16)
    assert (gpu.vendor, gpu.arch, gpu.clusters) == (
        ("amd", "gfx942", False) if hip else ("nvidia", "sm_90", True))


def test_triton_version():
    assert device.triton_version("3.8.0+git1a2b") == (3, 8)
    assert device.triton_version("3.10.1") == (3, 10)
    assert device.triton_version() == device.triton_version(triton.__version__)


@pytest.mark.parametrize("version, lowers", [("3.6.0", False), ("3.7.1", False), ("3.8.0", True),
                                             ("3.9.0", True)])
def test_clusters_need_triton_3_8(monkeypatch, no_env, version, lowers):
    monkeypatch.setattr(triton, "__version__", version)
    h100 = device.EMULATED["h100"]
    assert not device.cluster_launch(h100, real=False)  # not asked for
    monkeypatch.setenv(device.CLUSTERS_ENV, "1")
    assert device.cluster_launch(h100, real=False) == lowers
    assert not device.cluster_launch(device.EMULATED["a100"], real=False)


def test_compile_probe():
    """The one-time probe a real sm_90 device runs: a 2-CTA cluster compiles with a Triton that
    lowers clusters, and the probe says no (with a warning) for a target without them."""
    code = ("import warnings; from triton_instnorm import device\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = device._probe((9, 0)), device._probe((8, 0))\n"
            "print(*ok, sum(device.CLUSTERS_ENV in str(m.message) for m in w))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lowers = device.triton_version() >= device.FIRST_CLUSTER_TRITON
    assert out.stdout.split()[-3:] == [str(lowers), "False", "1" if lowers else "2"], out.stdout


def _nvidia_warps(tile):  # 32 elements per lane, 1 to 16 warps of 32 lanes
    return min(max(tile // 1024, 1), 16)


@pytest.mark.parametrize("tile", [1 << k for k in range(17)])
def test_warps_are_counted_in_lanes(tile):
    assert heuristics._warps(tile, 32) == _nvidia_warps(tile)
    # the same lanes on 64-lane wavefronts, one wavefront at least
    assert heuristics._warps(tile, 64) * 64 == max(heuristics._warps(tile, 32) * 32, 64)
    if tile >= 1024:  # 16-bit tiles: 8 elements, 16 bytes per lane, on either
        assert tile // (heuristics._warps(tile, 64) * 64) >= 8


@pytest.mark.parametrize("gpu, rows", [("h100", 4), ("a100", 8), ("mi300x", 2)])
def test_occupancy_follows_the_sm_count(monkeypatch, no_env, gpu, rows):
    """2048 planes of 64 elements share programs while 2 x SMs programs remain."""
    monkeypatch.setenv(device.EMULATE_ENV, gpu)
    x = torch.empty((1, 2048, 64))
    plan = triton_instnorm.explain(x).plans["forward"]
    assert plan.config.BLOCK_R == rows and plan.gpu is device.EMULATED[gpu]


def test_test_hooks_nest_restore_and_reach_other_threads():
    """Plain state, not a context variable: autograd runs a CUDA backward on its own thread."""
    seen = []
    with heuristics.tile_limit(16):
        with heuristics.split_planes(48):
            thread = threading.Thread(target=lambda: seen.append(
                (heuristics.HOOKS.tile_limit, heuristics.HOOKS.chunk_len)))
            thread.start()
            thread.join()
        assert (heuristics.HOOKS.tile_limit, heuristics.HOOKS.chunk_len) == (16, None)
        with pytest.raises(RuntimeError), heuristics.tile_limit(32):
            raise RuntimeError
        assert heuristics.HOOKS.tile_limit == 16
    assert seen == [(16, 48)]
    assert (heuristics.HOOKS.tile_limit, heuristics.HOOKS.chunk_len) == (None, None)
