"""``python -m perf.traffic``, the command over perf/counting.py: where its tables go. A smoke run
never writes over the committed tables under perf/results/."""

import os
import tempfile
from pathlib import Path

import pytest

from perf import files, machine, traffic

pytestmark = [pytest.mark.perf,
              pytest.mark.skipif(not machine.interpreting(),
                                 reason="traffic is counted through Triton's interpreter only")]

COMMITTED = (files.TRAFFIC_TABLE, files.CLUSTER_TRAFFIC_TABLE)


def _state(paths):
    return {p: (Path(p).read_bytes(), os.stat(p).st_mtime_ns) if os.path.exists(p) else None
            for p in paths}


@pytest.mark.parametrize("argv", [[], ["--clusters"]], ids=["plain", "clusters"])
def test_table_paths(argv, tmp_path, monkeypatch):
    """Full runs write the committed table of what they count, smoke runs a new temp dir,
    ``--out`` wins over both."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    committed = files.CLUSTER_TRAFFIC_TABLE if argv else files.TRAFFIC_TABLE
    assert traffic.out_path(traffic.parse_args(argv)) == committed
    smoke = Path(traffic.out_path(traffic.parse_args(["--smoke", *argv])))
    assert smoke.parent.parent == tmp_path and smoke.name == os.path.basename(committed)
    out = str(tmp_path / "mine.md")
    assert traffic.out_path(traffic.parse_args(["--smoke", *argv, "--out", out])) == out


def test_smoke_run_leaves_the_committed_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _state(COMMITTED)
    assert traffic.main(["--smoke", "--classes", "gan_2d", "--dtypes", "bfloat16"]) == 0
    assert _state(COMMITTED) == before
    (written,) = [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines()
                  if line.startswith("wrote ")]
    assert Path(written).parent.parent == tmp_path
    text = Path(written).read_text()
    assert "smoke shapes: tiny" in text and "| 1x4x32x32 | bfloat16 | forward | _fwd 4 |" in text
