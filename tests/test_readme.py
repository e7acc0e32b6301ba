"""The README runs as written: every ```python block is executed, on CUDA as written and on the
CPU (through Triton's interpreter) at small sizes; every ```bash command names what exists (the
extras it installs, the pytest markers and plugins it uses, the perf commands and their options,
the scripts it runs).

The small sizes are honest: SMALL lists each README line that changes on the CPU, the line must
be in the README exactly once, and only its numbers may differ.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from utils import DEVICE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]

SMALL = {  # README line: the line run on the CPU
    "x = torch.randn(8, 64, 128, 128, device=device, requires_grad=True)":
        "x = torch.randn(2, 64, 6, 6, device=device, requires_grad=True)",
    "out = net(torch.randn(2, 1, 32, 32, 32, device=device))":
        "out = net(torch.randn(2, 1, 4, 4, 4, device=device))",
    "x = torch.randn(1, 3, 64, 64)": "x = torch.randn(1, 3, 8, 8)",
    "half = torch.randn(2, 32, 64, 128, 128, device=device)  # this rank's half of 128 slices":
        "half = torch.randn(2, 32, 2, 3, 2, device=device)  # this rank's half of 4 slices",
}
# A block whose first line says how it is launched: torchrun, with this many processes.
TORCHRUN = re.compile(r"^# torchrun --nproc-per-node (\d+) ")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


def test_small_sizes_change_numbers_only():
    lines = README.splitlines()
    for line, small in SMALL.items():
        assert lines.count(line) == 1, line
        assert re.sub(r"\d+", "#", line) == re.sub(r"\d+", "#", small), (line, small)


def _as_run_here(code):
    if DEVICE == "cuda":
        return code
    return "\n".join(SMALL.get(line, line) for line in code.splitlines())


@pytest.mark.parametrize("i", range(len(PYTHON)))
def test_python_block_runs(i, tmp_path, monkeypatch, launches):
    code = PYTHON[i]
    if "torch.onnx" in code and not HAS_ONNX:
        pytest.skip("needs the onnx extra")
    if TORCHRUN.match(code):
        return _torchrun(code, int(TORCHRUN.match(code).group(1)), tmp_path)
    monkeypatch.chdir(tmp_path)  # files it writes
    exec(compile(_as_run_here(code), f"README.md python block {i}", "exec"), {})
    if "torch.onnx" not in code:  # (exports trace torch's ops)
        assert launches("_fwd") > 0  # our kernels computed it
    if ".backward()" in code:
        assert launches("_bwd") > 0


def _torchrun(code, processes, tmp_path):
    """The block as a script launched by torchrun on this machine (``--standalone``: a local
    rendezvous on a free port), each process printing the launches of our kernels at its end."""
    script = tmp_path / "train.py"
    script.write_text(_as_run_here(code) + "\nprint('launches', dict(tin.launch.LAUNCHES))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(processes), str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = [eval(line.split(" ", 1)[1]) for line in run.stdout.splitlines()
              if line.startswith("launches ")]
    assert len(counts) == processes, run.stdout[-3000:]
    for launched in counts:  # our kernels computed it, forward and backward, on every process
        assert launched.get("_fwd", 0) > 0 and launched.get("_bwd", 0) > 0, launched


def _commands():
    """(command words, environment assignments) of every bash line, comments dropped."""
    for block in BASH:
        for line in block.splitlines():
            for command in line.split("#")[0].split("&&"):
                words = shlex.split(command)
                env = {}
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    name, value = words.pop(0).split("=", 1)
                    env[name] = value
                if words:
                    yield words, env


def _option(words, name):
    return words[words.index(name) + 1] if name in words else None


def test_bash_commands_name_what_exists():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    pytest_options = project["tool"]["pytest"]["ini_options"]
    seen = set()
    for words, env in _commands():
        if words[:2] == ["pip", "install"]:
            for spec in words[2:]:
                match = re.fullmatch(r"-e|\.\[([\w,]+)\]|torch==[\d.]+|--index-url|\S+", spec)
                if match and match.group(1):
                    assert set(match.group(1).split(",")) <= set(extras), spec
            if "--index-url" in words:
                assert _option(words, "--index-url").endswith("/whl/cpu")
            seen.add("pip")
        elif words[:3] == ["python", "-m", "pytest"]:
            assert env.get("TRITON_INTERPRET") == "1"
            marker = _option(words[3:], "-m")
            if marker:
                assert any(m.startswith(f"{marker}:") for m in pytest_options["markers"])
            if "-n" in words:
                assert any(dep.startswith("pytest-xdist") for dep in extras["test"])
            seen.add("pytest")
        elif words[:2] == ["python", "-m"] and words[2].startswith("perf."):
            options = [w for w in words[3:] if w.startswith("--")]
            help_text = subprocess.run(
                [sys.executable, "-m", words[2], "--help"], cwd=ROOT, capture_output=True,
                text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            assert help_text.returncode == 0, help_text.stderr
            assert all(o in help_text.stdout for o in options), (words, help_text.stdout)
            seen.add("perf")
        elif words[0] == "bash":
            assert (ROOT / words[1]).is_file(), words
        else:
            assert words[0] in ("python3", "."), words  # the virtual environment
    assert seen == {"pip", "pytest", "perf"}
