"""The transform matrix (``_matrix.py``): every entry point under every transform gives torch's
outcome: the same values, gradients or tangents and running statistics, or the same exception
type. A cell raises exactly where a rule of NOT_SUPPORTED says so, and the README's "Not
supported" list is those rules' lines."""

import importlib.util
import re
import textwrap
from pathlib import Path

import _matrix as M
import pytest
import torch

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
README = Path(__file__).resolve().parents[1] / "README.md"


def _routed(entry):
    return M.ENTRIES[entry][3]


def _running_stats(entry):
    return not entry.startswith("adaptive")


# The cells that raise: (transform, the (entry, mode) cells of it that raise, the README's line).
NOT_SUPPORTED = [
    ("torch.jit.script", lambda entry, mode: not _routed(entry),
     "`torch.jit.script` of our function, modules, converted models and adaptive forms: script "
     "after `revert_instance_norm` (under `enabled()`, torch's modules script to torch's own "
     "computation)."),
    ("vmap over the batch", lambda entry, mode: mode == "train" and _running_stats(entry),
     "`vmap` over the batch of a layer that updates running statistics in training, as torch's: "
     "running statistics outside the vmapped dimension cannot take a batched update (stack them "
     "per model, as the ensembling recipe does)."),
]


def raises(entry, transform, mode) -> bool:
    return any(t == transform and cells(entry, mode) for t, cells, _ in NOT_SUPPORTED)


def _cells():
    for entry, (_, _, modes, _) in M.ENTRIES.items():
        for transform in M.TRANSFORMS:
            for mode in modes:
                marks = ()
                if transform.startswith("ONNX") and not HAS_ONNX:
                    marks = pytest.mark.skip(reason="needs the onnx extra")
                yield pytest.param(entry, transform, mode, marks=marks,
                                   id=f"{entry}-{transform}-{mode}")


def _same(got, want, tol):
    if isinstance(want, type) or isinstance(got, type):
        assert got is want, (got, want)
        return
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None or g is None:
            assert g is w
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, (g, w)
        torch.testing.assert_close(g.detach().cpu(), w.detach().cpu(), atol=tol, rtol=tol,
                                   equal_nan=True)


@pytest.mark.parametrize("entry,transform,mode", list(_cells()))
def test_cell_matches_torch(entry, transform, mode):
    ours, ref, x, context = M.build(entry, mode)
    got = M.outcome(M.TRANSFORMS[transform], ours, x, context)
    assert isinstance(got, type) == raises(entry, transform, mode), got
    if isinstance(got, type) and transform == "torch.jit.script":
        return  # torch scripts its own modules (our reference compositions need not script)
    want = M.outcome(M.EAGER_ORACLE.get(transform, M.TRANSFORMS[transform]), ref, x)
    _same(got, want, M.LOOSE.get(transform, 1e-4))


def readme_lines():
    """The README's "Not supported" list, as NOT_SUPPORTED gives it."""
    lines = ["- **Not supported** (each raises; the transform matrix checks this list):"]
    for _, _, text in NOT_SUPPORTED:
        lines += textwrap.wrap(text, width=100, initial_indent="  - ",
                               subsequent_indent="    ", break_on_hyphens=False)
    return lines


def test_readme_lists_the_cells_that_raise():
    readme = README.read_text().splitlines()
    start = readme.index(readme_lines()[0])
    listed = readme[start:start + 1]
    for line in readme[start + 1:]:
        if not re.match(r"  (- |  )\S", line):
            break
        listed.append(line)
    assert listed == readme_lines()
