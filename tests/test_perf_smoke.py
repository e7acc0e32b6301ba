"""The bandwidth report's pipeline (measure -> CSV -> summary -> plots), ``python -m perf.report
--smoke`` in a subprocess, writing under pytest's tmp_path only. Without a GPU the kernels run
through Triton's interpreter; with one they are compiled and timed briefly. Every run names its
providers, so that no run pays inductor compiles unless it asks for torch_compile.
"""

import importlib.util

import pytest
import torch
from _perf_cli import check_pngs, read_csv, repo_outputs, run_perf

from perf import model
from perf.schema import BANDWIDTH_COLUMNS, PEER_PROVIDERS, PROVIDERS
from perf.shapes import SHAPE_CLASSES

pytestmark = [pytest.mark.perf, pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                                    reason="the plots need matplotlib")]

HAS_GPU = torch.cuda.is_available()
PLOT_NAMES = ("bandwidth_vs_plane.png", "roofline.png", "speedup.png")
PROVIDER_ARGS = ("--providers", "triton_instnorm,torch_eager,flag_gems,liger_groupnorm")
INSTALLED = {name: importlib.util.find_spec(module) is not None
             for name, module in (("flag_gems", "flag_gems"), ("liger_groupnorm", "liger_kernel"))}


def peers_measured(dtype):
    """Installed peers; on the interpreter only Liger, and not in bfloat16 (FlagGems cannot run
    there, Liger's backward needs bfloat16 atomics)."""
    if HAS_GPU:
        return [name for name, ok in INSTALLED.items() if ok]
    return ["liger_groupnorm"] if INSTALLED["liger_groupnorm"] and dtype != "bfloat16" else []


def check_rows(rows, classes, dtypes, directions, providers, peers_for=lambda dtype: []):
    groups = {}
    for r in rows:
        assert r["direction"] in model.DIRECTIONS and r["provider"] in PROVIDERS
        assert r["device"] and r["torch"] and r["triton"] and r["date"]
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["pct_of_roof"]) > 0
        key = (r["shape_class"], r["shape"], r["dtype"], r["direction"])
        groups.setdefault(key, []).append(r["provider"])
        if r["provider"] == "copy":
            assert float(r["pct_of_roof"]) == pytest.approx(100)
    assert {k[0] for k in groups} == set(classes)
    assert {k[2] for k in groups} == set(dtypes)
    assert {k[3] for k in groups} == set(directions)
    for key, provs in groups.items():  # the copy roof is always measured
        assert sorted(provs) == sorted(providers + peers_for(key[2]) + ["copy"]), key
    return groups


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf_smoke")
    before = repo_outputs()
    proc = run_perf("report", "--smoke", *PROVIDER_ARGS, "--out", str(out),
                    "--plots", str(out / "plots"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert repo_outputs() == before, "the smoke run must not touch perf/results/ or plots/"
    return out, proc


def test_smoke_csv_schema_and_rows(smoke_run):
    out, _ = smoke_run
    columns, rows = read_csv(out)
    assert columns == BANDWIDTH_COLUMNS == [
        "device", "torch", "triton", "date", "shape_class", "shape", "dtype",
        "direction", "provider", "ms", "gbps", "pct_of_roof"]
    groups = check_rows(rows, SHAPE_CLASSES, model.DTYPES, model.DIRECTIONS,
                        ["triton_instnorm", "torch_eager"], peers_measured)
    # plane_sweep contributes several plane sizes, so the bandwidth curve has points.
    assert len({k[1] for k in groups if k[0] == "plane_sweep"}) >= 3


def test_smoke_summary_and_plots(smoke_run):
    out, proc = smoke_run
    check_pngs(out / "plots", PLOT_NAMES)
    (md,) = out.glob("*.md")
    text = md.read_text()
    assert "| class | dtype | direction |" in text and "speedup vs eager" in text
    assert "| plane_sweep | bfloat16 | forward+backward |" in text
    assert "## Memory traffic" in text  # the committed traffic table's per-class lines
    assert "| class | dtype | direction |" in proc.stdout  # the summary is printed too
    assert "[" in proc.stderr and "copy" in proc.stderr  # per-measurement progress lines


def test_smoke_lists_every_peer(smoke_run):
    """Each peer: measured rows, or "unavailable: <reason>" in one start line and in the summary."""
    out, proc = smoke_run
    start_lines = [line for line in proc.stderr.splitlines() if line.startswith("peer providers: ")]
    assert len(start_lines) == 1, proc.stderr[-3000:]
    text = next(out.glob("*.md")).read_text()
    assert "## Peer providers" in text
    _, rows = read_csv(out)
    for name in PEER_PROVIDERS:
        measured = [r for r in rows if r["provider"] == name]
        (cell,) = [line for line in text.splitlines() if line.startswith(f"| {name} | ")]
        if any(name in peers_measured(dtype) for dtype in model.DTYPES):
            assert measured and f"{name}: available" in start_lines[0]
            assert cell.startswith(f"| {name} | measured: {len(measured)} rows")
        else:
            assert not measured and f"{name}: unavailable: " in start_lines[0]
            assert cell.startswith(f"| {name} | unavailable: ") and len(cell) > len(name) + 30
    if not HAS_GPU and INSTALLED["liger_groupnorm"]:
        assert "unavailable for bfloat16: Triton's interpreter has no bfloat16 atomics" in text
    if INSTALLED["liger_groupnorm"]:
        assert "speedup vs liger_groupnorm" in text


@pytest.mark.skipif(HAS_GPU, reason="with a GPU the plain command measures instead of redrawing")
def test_redraw_from_csv_without_gpu(smoke_run, tmp_path):
    out, _ = smoke_run
    plots = tmp_path / "redrawn"
    proc = run_perf("report", "--out", str(out), "--plots", str(plots), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1 and "No CUDA GPU" in proc.stdout
    check_pngs(plots, PLOT_NAMES)


@pytest.mark.skipif(HAS_GPU, reason="with a GPU the plain command measures instead")
def test_no_gpu_and_no_csv_says_so(tmp_path):
    proc = run_perf("report", "--out", str(tmp_path / "empty"), "--plots", str(tmp_path / "plots"),
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1 and "no CSV" in proc.stdout
    assert not (tmp_path / "plots").exists()


def test_smoke_torch_compile_one_shape(tmp_path):
    """torch.compile on one tiny shape: ~15 s of inductor on the CPU, cold."""
    proc = run_perf("report", "--smoke", "--out", str(tmp_path), "--classes", "tiny_planes",
                    "--dtypes", "float32", "--providers", "triton_instnorm,torch_compile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    check_rows(read_csv(tmp_path)[1], ["tiny_planes"], ["float32"], model.DIRECTIONS,
               ["triton_instnorm", "torch_compile"])
    check_pngs(tmp_path / "plots", PLOT_NAMES)
    assert "speedup vs compile" in next(tmp_path.glob("*.md")).read_text()


def test_smoke_module_path_and_budget(tmp_path):
    """--module times InstanceNorm1d (plane_sweep) and 3d (nnunet_3d); --budget 0 stops after
    the first (shape, dtype) and says so; a second run merges its rows into the CSV."""
    common = ("--smoke", "--out", str(tmp_path), "--dtypes", "float32",
              "--directions", "forward,backward", "--providers", "triton_instnorm")
    proc = run_perf("report", *common, "--module", "--classes", "nnunet_3d,plane_sweep")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    check_rows(read_csv(tmp_path)[1], ["nnunet_3d", "plane_sweep"], ["float32"],
               ["forward", "backward"], ["triton_instnorm"])
    assert "InstanceNorm modules (--module)" in next(tmp_path.glob("*.md")).read_text()
    proc = run_perf("report", *common, "--classes", "gan_2d,tiny_planes", "--budget", "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "--budget 0 s spent: 1 (shape, dtype) cases not measured" in proc.stdout
    classes = {r["shape_class"] for r in read_csv(tmp_path)[1]}
    assert classes == {"nnunet_3d", "plane_sweep", "gan_2d"}


@pytest.mark.slow
@pytest.mark.skipif(HAS_GPU, reason="on a GPU perf/first_light.sh times torch.compile on the "
                                    "workload classes at full size")
def test_smoke_torch_compile_all_classes(tmp_path):
    """Every smoke shape through torch.compile too: ~10 s of CPU compiling per shape and dtype."""
    proc = run_perf("report", "--smoke", "--out", str(tmp_path), "--dtypes", "float32,bfloat16",
                    "--providers", "triton_instnorm,torch_eager,torch_compile", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    check_rows(read_csv(tmp_path)[1], SHAPE_CLASSES, ["float32", "bfloat16"], model.DIRECTIONS,
               ["triton_instnorm", "torch_eager", "torch_compile"])
    check_pngs(tmp_path / "plots", PLOT_NAMES)
