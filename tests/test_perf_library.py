"""The perf library without running a benchmark: the byte model, shape classes, the interpreter
switch, CSV merging, the summary and the report's default providers."""

import pytest
import torch

import triton_instnorm
from perf import files, machine, model, report, shapes, summary


def test_byte_model():
    shape = (2, 3, 16, 16)
    n = 2 * 3 * 256
    small = model.norm_bytes(shape, "float32", "forward") - 2 * n * 4
    assert 0 < small < 0.1 * n * 4  # only weight/bias/stats on top of read x + write y
    assert model.norm_bytes(shape, "bfloat16", "backward") >= 3 * n * 2
    assert model.norm_bytes(shape, "float16", "forward+backward") == sum(
        model.norm_bytes(shape, "float16", d) for d in ("forward", "backward"))
    assert model.copy_bytes(shape, "bfloat16") == 2 * n * 2
    assert model.flops(shape, "forward+backward") == 20 * n
    assert model.known_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(66.9)
    assert model.known_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(51.2)
    assert model.known_peak_tflops("a CPU") is None
    assert files.slugify("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"


def test_shape_classes_check_their_shapes():
    with pytest.raises(ValueError, match="channels_last"):
        shapes.ShapeClass("bad", ((2, 3, 4),), ((2, 3, 4),), "channels_last")
    with pytest.raises(ValueError, match="memory_format"):
        shapes.ShapeClass("bad", ((2, 3, 4),), ((2, 3, 4),), "nhwc")
    with pytest.raises(SystemExit, match="unknown shape class"):
        shapes.select_classes(["gan_2d", "no_such_class"])
    sweep = shapes.SHAPE_CLASSES["plane_sweep"]
    assert {shape[1] * shape[2] for shape in sweep.shapes} == {2**24}


def test_the_interpreter_check_agrees_with_the_package():
    """The suite's process: kernels on CPU tensors exactly when perf says the interpreter is on."""
    assert machine.interpreting() == triton_instnorm.kernels_available(torch.empty(0))


@pytest.mark.parametrize("value", [None, "0", "1", "true", "On", "yes", "y", " 1", "2"])
def test_the_interpreter_check_reads_the_variable_as_triton_does(monkeypatch, value):
    knobs = pytest.importorskip("triton.knobs")
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert machine.interpreting() == knobs.runtime.interpret


def test_csv_merge_replaces_only_the_rows_measured_again(tmp_path):
    path = str(tmp_path / "device.csv")
    columns, key = ["name", "value"], ("name",)
    old = [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]
    files.write_csv(path, old, columns, key, sort_key=lambda r: r["name"], merge=True)
    rows = files.write_csv(path, [{"name": "b", "value": "3"}, {"name": "c", "value": "4"}],
                         columns, key, sort_key=lambda r: r["name"], merge=True)
    assert rows == files.read_csv(path, columns) == [
        {"name": "a", "value": "1"}, {"name": "b", "value": "3"}, {"name": "c", "value": "4"}]
    rows = files.write_csv(path, [{"name": "z", "value": "0"}], columns, key,
                         sort_key=lambda r: r["name"], merge=False)
    assert files.read_csv(path, columns) == rows == [{"name": "z", "value": "0"}]
    with pytest.raises(ValueError, match="columns"):
        files.read_csv(path, ["name"])


def _row(provider, ms, shape="2x3x4x4", dtype="float32", direction="forward"):
    gbps = model.gbps(model.norm_bytes(model.shape_from_str(shape), dtype, direction), ms)
    return {"device": "D", "torch": "t", "triton": "t", "date": "d", "shape_class": "gan_2d",
            "shape": shape, "dtype": dtype, "direction": direction, "provider": provider,
            "ms": str(ms), "gbps": str(gbps), "pct_of_roof": "50"}


def test_bandwidth_summary_and_speedups():
    rows = [_row("copy", 1.0), _row("triton_instnorm", 2.0), _row("torch_eager", 4.0),
            _row("copy", 1.0, shape="2x3x8x8"), _row("triton_instnorm", 1.0, shape="2x3x8x8"),
            _row("torch_eager", 4.0, shape="2x3x8x8")]
    assert summary.overall_speedups(rows) == {"torch_eager": pytest.approx(8**0.5)}
    text = summary.bandwidth(rows, "T", ["a note"], peers={"flag_gems": "unavailable: why"})
    lines = text.splitlines()
    assert lines[:4] == ["# T", "", "- a note", ""]
    assert lines[4] == ("| class | dtype | direction | shapes | triton_instnorm GB/s (% roof) | "
                        "torch_eager GB/s (% roof) | copy GB/s | speedup vs eager |")
    assert lines[6].startswith("| gan_2d | float32 | forward | 2 |")
    assert lines[6].endswith("| 2.83x |")
    assert lines[-3:] == ["| peer | status |", "|---|---|", "| flag_gems | unavailable: why |"]


def test_report_default_providers():
    assert "torch_compile" in report.default_providers(interpret=False)
    assert "torch_compile" not in report.default_providers(interpret=True)
    assert "triton_instnorm_clusters" not in report.default_providers(interpret=False)
