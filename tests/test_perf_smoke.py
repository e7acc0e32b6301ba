"""Smoke test of the perf report pipeline (measure -> CSV -> summary -> plots).

Runs ``python -m perf.report --smoke`` in a subprocess: without a GPU the
kernels must run through Triton's interpreter, and TRITON_INTERPRET has to be
set before triton is first imported, which an in-process call cannot
guarantee once other tests imported triton_instnorm.  Everything is written
under pytest's tmp_path, never into the repository's perf/results/ or plots/.
"""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from _perf_cli import PNG_MAGIC, REPO_ROOT, repo_outputs, run_perf

sys.path.insert(0, str(REPO_ROOT))

from perf import model  # noqa: E402  (torch/triton-free)
from perf.shapes import SHAPE_CLASSES  # noqa: E402

HAS_GPU = torch.cuda.is_available()
PLOT_NAMES = ("bandwidth_vs_plane.png", "roofline.png", "speedup.png")
# The default smoke run: every shape class and dtype; torch_compile is left
# out there (CPU inductor compiles cost ~10 s per shape) and covered on one
# tiny shape by test_smoke_torch_compile_one_shape.
CLASSES = list(SHAPE_CLASSES)
DTYPES = list(model.DTYPES)
PROVIDERS = ["triton_instnorm", "torch_eager"]
INSTALLED = {name: importlib.util.find_spec(module) is not None
             for name, module in (("flag_gems", "flag_gems"), ("liger_groupnorm", "liger_kernel"))}


def default_peers(dtype):
    """Peers the default smoke run measures: installed ones; on the interpreter only Liger, and
    not in bfloat16 (FlagGems cannot run there, Liger's backward needs bfloat16 atomics)."""
    if HAS_GPU:
        return [name for name, ok in INSTALLED.items() if ok]
    return ["liger_groupnorm"] if INSTALLED["liger_groupnorm"] and dtype != "bfloat16" else []


def run_report(*args, timeout=600):
    return run_perf("report", *args, timeout=timeout)


def read_rows(out_dir: Path):
    csvs = list(out_dir.glob("*.csv"))
    assert len(csvs) == 1, csvs
    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        return csvs[0], reader.fieldnames, list(reader)


def check_pngs(plots_dir: Path):
    for name in PLOT_NAMES:
        pngs = list(plots_dir.glob(f"*_{name}"))
        assert len(pngs) == 1, (name, sorted(p.name for p in plots_dir.iterdir()))
        assert pngs[0].stat().st_size > 1000
        assert pngs[0].read_bytes()[:8] == PNG_MAGIC


def check_rows(rows, classes, dtypes, directions, providers, peers_for=lambda dtype: []):
    groups = {}
    for r in rows:
        assert r["direction"] in model.DIRECTIONS and r["provider"] in model.PROVIDERS
        assert r["device"] and r["torch"] and r["triton"] and r["date"]
        assert float(r["ms"]) > 0 and float(r["gbps"]) > 0 and float(r["pct_of_roof"]) > 0
        groups.setdefault((r["shape_class"], r["shape"], r["dtype"], r["direction"]), []).append(r["provider"])
    assert {k[0] for k in groups} == set(classes)
    assert {k[2] for k in groups} == set(dtypes)
    assert {k[3] for k in groups} == set(directions)
    for key, provs in groups.items():
        expected = providers + peers_for(key[2]) + ["copy"]  # the copy roof is always measured
        assert sorted(provs) == sorted(expected), key
    for r in rows:
        if r["provider"] == "copy":
            assert float(r["pct_of_roof"]) == pytest.approx(100)
    return groups


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf_smoke")
    before = repo_outputs()
    # No --classes/--dtypes/--providers: the smoke defaults must be exactly these.
    proc = run_report("--smoke", "--out", str(out), "--plots", str(out / "plots"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert repo_outputs() == before, "the smoke run must not touch perf/results/ or plots/"
    return out, proc


def test_smoke_csv_schema_and_rows(smoke_run):
    out, _ = smoke_run
    _, columns, rows = read_rows(out)
    assert columns == model.CSV_COLUMNS == [
        "device", "torch", "triton", "date", "shape_class", "shape", "dtype",
        "direction", "provider", "ms", "gbps", "pct_of_roof"]
    groups = check_rows(rows, CLASSES, DTYPES, model.DIRECTIONS, PROVIDERS, default_peers)
    # plane_sweep contributes several plane sizes, so the bandwidth curve has points.
    assert len({k[1] for k in groups if k[0] == "plane_sweep"}) >= 3


def test_smoke_summary_and_plots(smoke_run):
    out, proc = smoke_run
    check_pngs(out / "plots")
    md = list(out.glob("*.md"))
    assert len(md) == 1
    text = md[0].read_text()
    assert "| class | dtype | direction |" in text and "speedup vs eager" in text
    assert "| plane_sweep | bfloat16 | forward+backward |" in text
    assert "## Memory traffic" in text  # perf/traffic_report.section(), counted on the CPU
    assert "| class | dtype | direction |" in proc.stdout  # the summary is printed too
    assert "[" in proc.stderr and "copy" in proc.stderr  # per-measurement progress lines


def test_smoke_lists_every_peer(smoke_run):
    """Each peer: measured rows, or "unavailable: <reason>" in one start line and in the summary."""
    out, proc = smoke_run
    start_lines = [line for line in proc.stderr.splitlines() if line.startswith("peer providers: ")]
    assert len(start_lines) == 1, proc.stderr[-3000:]
    text = next(out.glob("*.md")).read_text()
    assert "## Peer providers" in text
    _, _, rows = read_rows(out)
    for name in model.PEER_PROVIDERS:
        measured = [r for r in rows if r["provider"] == name]
        (cell,) = [line for line in text.splitlines() if line.startswith(f"| {name} | ")]
        if any(name in default_peers(dtype) for dtype in DTYPES):
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
    proc = run_report("--out", str(out), "--plots", str(plots), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert "No CUDA GPU" in proc.stdout
    check_pngs(plots)


@pytest.mark.skipif(HAS_GPU, reason="with a GPU the plain command measures instead")
def test_no_gpu_and_no_csv_says_so(tmp_path):
    proc = run_report("--out", str(tmp_path / "empty"), "--plots", str(tmp_path / "plots"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1 and "no CSV" in proc.stdout
    assert not (tmp_path / "plots").exists()


def test_byte_model():
    shape = (2, 3, 16, 16)
    n = 2 * 3 * 256
    small = model.norm_bytes(shape, "float32", "forward") - 2 * n * 4
    assert 0 < small < 0.1 * n * 4  # only weight/bias/stats on top of read x + write y
    assert model.norm_bytes(shape, "bfloat16", "backward") >= 3 * n * 2
    assert model.norm_bytes(shape, "float16", "forward+backward") == (
        model.norm_bytes(shape, "float16", "forward") + model.norm_bytes(shape, "float16", "backward"))
    assert model.copy_bytes(shape, "bfloat16") == 2 * n * 2
    assert model.slugify("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert model.known_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(66.9)
    assert model.known_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(51.2)


def test_smoke_torch_compile_one_shape(tmp_path):
    """torch.compile on CPU (inductor + gcc): one tiny shape keeps it to ~15 s cold."""
    proc = run_report("--smoke", "--out", str(tmp_path), "--classes", "tiny_planes",
                      "--dtypes", "float32", "--providers", "triton_instnorm,torch_compile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _, _, rows = read_rows(tmp_path)
    check_rows(rows, ["tiny_planes"], ["float32"], model.DIRECTIONS, ["triton_instnorm", "torch_compile"])
    check_pngs(tmp_path / "plots")
    assert "speedup vs compile" in next(tmp_path.glob("*.md")).read_text()


def test_smoke_module_path(tmp_path):
    """--module times triton_instnorm through InstanceNorm1d (plane_sweep) and 3d (nnunet_3d)."""
    proc = run_report("--smoke", "--module", "--out", str(tmp_path), "--classes", "nnunet_3d,plane_sweep",
                      "--dtypes", "float32", "--directions", "forward,backward",
                      "--providers", "triton_instnorm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _, _, rows = read_rows(tmp_path)
    check_rows(rows, ["nnunet_3d", "plane_sweep"], ["float32"], ["forward", "backward"], ["triton_instnorm"])
    assert "InstanceNorm modules (--module)" in next(tmp_path.glob("*.md")).read_text()


@pytest.mark.slow
def test_smoke_torch_compile_all_classes(tmp_path):
    """Every smoke shape through torch.compile too: ~10 s of CPU compiling per shape and dtype."""
    proc = run_report("--smoke", "--out", str(tmp_path), "--dtypes", "float32,bfloat16",
                      "--providers", "triton_instnorm,torch_eager,torch_compile", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _, _, rows = read_rows(tmp_path)
    check_rows(rows, CLASSES, ["float32", "bfloat16"], model.DIRECTIONS,
               ["triton_instnorm", "torch_eager", "torch_compile"])
    check_pngs(tmp_path / "plots")
