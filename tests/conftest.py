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
