"""The instruction audit (perf/sass.py) holds for the benchmark networks, compiled for sm_90.

Every pass the networks' training steps and eval forwards launch (bfloat16 and float32, cluster
launches off and on) is compiled ahead of time and its SASS counted, as ``python -m perf.sass``
does; then:

- no pass takes more instructions per element than perf/results/sass.json records (2% slack),
  so that a change which adds instructions to a kernel fails here;
- every network's byte-weighted time factor at 70% issue efficiency stays within 1.05.

Both hold for the Triton that wrote the results (another release compiles differently, and is
skipped with the reason).

Skipped when this Triton cannot compile for sm_90 ahead of time (perf/aot.py).
"""

import json

import pytest

from perf import sass

pytestmark = pytest.mark.perf  # a performance audit: the second test tier

PINNED = json.loads((sass.RESULTS / "sass.json").read_text())
SLACK = 1.02
FACTOR_70 = 1.05


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    try:
        return sass.audit(list(_networks()), [], ["sm_90"], jobs=2,
                          workdir=tmp_path_factory.mktemp("sass"))
    except SystemExit as e:  # no sm_90 backend, or no AOT API, in this Triton
        pytest.skip(str(e))


def _networks():
    from perf import networks
    return networks.NETWORKS


def test_passes_take_no_more_instructions_than_recorded(audit):
    if audit["triton"] != PINNED["triton"]:
        pytest.skip(f"pins recorded with Triton {PINNED['triton']}, this is {audit['triton']}")
    grown = {}
    for key, row in audit["passes"].items():
        pinned = PINNED["passes"].get(key)
        assert pinned is not None, f"{key}: not in perf/results/sass.json (python -m perf.sass)"
        if row["per_element"] > pinned["per_element"] * SLACK + 0.05:
            grown[key] = (pinned["per_element"], round(row["per_element"], 2))
        assert not row["problems"], (key, row["problems"])
    assert not grown, grown


def test_networks_stay_within_the_issue_budget(audit):
    if audit["triton"] != PINNED["triton"]:
        pytest.skip(f"budgets recorded with Triton {PINNED['triton']}, this is {audit['triton']}")
    summary = sass.summary(audit)["networks"]
    over = {}
    for key, factors in summary.items():
        if factors["factor_70"] > FACTOR_70:
            over[key] = factors["factor_70"]
    assert not over, over
