"""Host cost per call against PyTorch's own ``F.instance_norm`` (``python -m perf.overhead``).

Launches are replaced by a no-op, so this times our Python alone, next to torch's whole call on
a tiny CPU tensor, interleaved in the same rounds (CPU time of this thread, median of rounds):
the bounds are generous so that a loaded machine passes, and a return of the per-call costs
this path once had (custom-op dispatch, launch plan recomputed per call: 4-8x torch's) fails.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import overhead  # noqa: E402

pytestmark = pytest.mark.perf  # a performance audit: the second test tier


def test_host_cost_within_bounds_of_torch():
    cases = overhead._Cases()
    with overhead.no_launches() as counts, overhead.one_thread():
        forward = overhead.time_rows({"ours": cases.module_forward,
                                      "torch": cases.torch_forward}, number=300, repeats=7)
        both = overhead.time_rows({"ours": cases.module_forward_backward,
                                   "torch": cases.torch_forward_backward}, number=100, repeats=7)
    assert counts["_fwd"] > 0 and counts["_bwd"] > 0  # our layer ran its (no-op) launches
    assert forward["ours"] <= 3 * forward["torch"], forward
    assert both["ours"] <= 4 * both["torch"], both


def test_no_launch_escapes_the_stand_in():
    """The measurement times no kernel: a launch other than through ``launch.run`` raises."""
    from triton_instnorm import launch

    with overhead.no_launches():
        try:
            launch._fwd[(1,)]
        except RuntimeError as e:
            assert "launched while launches are disabled" in str(e)
        else:
            raise AssertionError("a kernel could be launched")
    assert callable(launch._fwd[(1,)])  # restored
