"""Test set-up: CUDA when present, else the CPU through Triton's interpreter (tests/utils.py).

utils is imported before anything imports triton: it sets TRITON_INTERPRET when no GPU is visible
(the README's test command also sets it explicitly).
"""

import os
import tempfile

import pytest
import torch
from utils import DEVICE  # before triton: sets TRITON_INTERPRET without a GPU

import triton_instnorm
from triton_instnorm import launch



def _patch_each_language_once_per_launch():
    """Halves the interpreter's time per launch. Triton's interpreter re-patches triton.language
    (inspect.getmembers over tl, tl.tensor, tl.math) at every call of a @triton.jit helper, ~0.7
    ms each, and a program of ours calls tens of helpers. Within one launch the patch is the same
    every time, so a helper whose language modules the launch has already patched skips it. The
    kernels run exactly as before; on an interpreter without these two hooks nothing changes."""
    from triton.runtime import interpreter

    if not (hasattr(interpreter, "_patch_lang") and hasattr(interpreter, "_LangPatchScope")
            and hasattr(interpreter, "GridExecutor")):
        return
    patch_lang, launch_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    import triton.language as tl
    patched = []  # per running launch: the ids of the language modules it has patched

    def patch_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if patched and langs <= patched[-1]:
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if patched:
            patched[-1] |= langs
        return scope

    def launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_each_language_once_per_launch()

# A private inductor cache: compiled graphs cached on disk by another version of this package
# (another checkout, an older commit) would otherwise be reused with stale buffer shapes.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_instnorm_inductor_")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow sweeps")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow sweep: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _kernels_must_run():
    """Every test runs on a device the Triton kernels handle (never the eager fallback)."""
    assert triton_instnorm.kernels_available(torch.empty(0, device=DEVICE)), (
        "Triton kernels unavailable: run with TRITON_INTERPRET=1 on a CPU machine")
    yield


@pytest.fixture
def launches():
    """Counts kernel launches: ``launches()`` returns the counts since the fixture started."""
    start = dict(launch.LAUNCHES)

    def count(name="_fwd"):
        return launch.LAUNCHES[name] - start.get(name, 0)

    return count


@pytest.fixture
def poison(monkeypatch):
    """Fills every output and scratch buffer with NaN before the kernels run, so that an element
    a kernel fails to write shows up in the comparison."""

    def new_output(like):
        return torch.full_like(like, float("nan"))

    def new_buffer(like, shape, dtype):
        t = like.new_empty(shape, dtype=dtype)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(launch, "new_output", new_output)
    monkeypatch.setattr(launch, "new_buffer", new_buffer)
    yield
