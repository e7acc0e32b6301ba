"""pytest plugin, ``-p perf.deadline``: tests that would start after the Unix time in
``PERF_DEADLINE`` are skipped, so a run within a time budget ends cleanly and reports what
finished (perf/first_light.sh). Loaded into pytest-xdist's workers like any ``-p`` plugin."""

import os
import time

import pytest


def pytest_runtest_setup(item):
    if time.time() > float(os.environ.get("PERF_DEADLINE", "inf")):
        pytest.skip("not run: the time budget was spent")
