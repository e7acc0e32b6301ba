"""Memory traffic and grid sizes of Triton kernels, counted on the CPU through Triton's interpreter.

Why: how many bytes a kernel path moves and how many programs it launches decide most of its
speed on a GPU, and both can be known without one. Counting them per call of the public API
pins the kernels' traffic in tests (an extra sweep over x fails them) and gives the perf report
a "bytes moved / minimum" figure and the grid of every launch.

Usage (the kernels must run through the interpreter: ``TRITON_INTERPRET=1`` set before triton
is first imported)::

    from perf import traffic
    with traffic.count() as t:
        y = triton_instnorm.instance_norm(x)
    t.kernels()        # {name: Totals(launches, programs, bytes_loaded, bytes_stored)}
    t.loaded(x), t.stored(y), t.moved()   # bytes, per tensor or in all
    t.launches         # [Launch(kernel, grid, programs_run, constexprs, ...)] in launch order

What is counted, per launch:

- **bytes**: every load and store the interpreter executes (``tl.load`` / ``tl.store``: scalar or
  block, masked or not), unmasked lanes only, times the pointer's element size; attributed to
  the tensor argument whose storage each lane falls in (``loaded(x)`` covers x's whole storage,
  so views of one storage count together). Lanes, not distinct addresses: an element loaded
  twice counts twice, which is what a second sweep costs when the cache does not hold it.
  Caches, atomics and tensor-descriptor copies are not modelled (these kernels use none).
- **programs**: the launch's grid, every axis, also when no program is run.

How: while a ``count()`` is open, the interpreter's builder has its ``create_masked_load`` /
``create_masked_store`` (which plain loads and stores call too) and ``set_grid_dim`` /
``set_grid_idx`` wrapped, and ``GridExecutor.__call__`` records the kernel name, the tensor
arguments' storages and the constexpr values of each launch. Nothing depends on a kernel's
argument names. Tested with the interpreters of triton 3.6 and 3.9.

Which programs run (``count(programs=...)``):

- ``"all"`` (default): every program; the counts are exact.
- ``"sample"``: per grid axis of more than three programs, the first, the second and the last;
  the second stands for every interior program (its bytes are weighted by their number). Exact
  whenever interior programs along each axis move the same bytes (true of every launch of these
  kernels: only a last row block or chunk is partial and only chunk 0 writes per-plane results);
  makes full-size shapes countable in seconds. Outputs of the skipped programs stay unwritten.
- ``"none"``: no program runs: grids only, instant at any size.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

PROGRAM_MODES = ("all", "sample", "none")


@dataclass
class Launch:
    """One kernel launch: its grid and the bytes its programs loaded and stored.

    ``loaded`` / ``stored`` map the storage address of a tensor argument (None: lanes outside
    every tensor argument) to bytes."""

    kernel: str
    constexprs: dict
    grid: tuple = (1, 1, 1)
    ctas: int = 1  # CTAs per program (``num_ctas``: a cluster; the interpreter runs one)
    programs_run: int = 0
    loaded: dict = field(default_factory=lambda: defaultdict(int))
    stored: dict = field(default_factory=lambda: defaultdict(int))

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def bytes_loaded(self) -> int:
        return sum(self.loaded.values())

    @property
    def bytes_stored(self) -> int:
        return sum(self.stored.values())

    def grid_text(self) -> str:
        """``512`` or ``128x3``: the grid without trailing axes of 1."""
        dims = list(self.grid)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        return "x".join(str(d) for d in dims)


@dataclass
class Totals:
    """Sums over the launches of one kernel."""

    launches: int = 0
    programs: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0


def storage_key(tensor) -> int:
    """The key ``Launch.loaded`` / ``stored`` use for a tensor: its storage's address."""
    return tensor.untyped_storage().data_ptr()


class Traffic:
    """What one ``count()`` block launched; filled in while the block runs."""

    def __init__(self, programs: str):
        self.programs = programs
        self.launches: list[Launch] = []

    def _select(self, field_name: str, tensor, kernel) -> int:
        key = None if tensor is None else storage_key(tensor)
        total = 0
        for launch in self.launches:
            if kernel is not None and launch.kernel != kernel:
                continue
            by_storage = getattr(launch, field_name)
            total += sum(by_storage.values()) if tensor is None else by_storage.get(key, 0)
        return total

    def loaded(self, tensor=None, kernel: str | None = None) -> int:
        """Bytes loaded (from ``tensor``'s storage, by ``kernel``; None: all)."""
        return self._select("loaded", tensor, kernel)

    def stored(self, tensor=None, kernel: str | None = None) -> int:
        """Bytes stored (into ``tensor``'s storage, by ``kernel``; None: all)."""
        return self._select("stored", tensor, kernel)

    def moved(self, tensor=None, kernel: str | None = None) -> int:
        return self.loaded(tensor, kernel) + self.stored(tensor, kernel)

    def kernels(self) -> dict[str, Totals]:
        """{kernel name: Totals}, in order of first launch."""
        out: dict[str, Totals] = {}
        for launch in self.launches:
            tot = out.setdefault(launch.kernel, Totals())
            tot.launches += 1
            tot.programs += launch.programs
            tot.bytes_loaded += launch.bytes_loaded
            tot.bytes_stored += launch.bytes_stored
        return out

    def grids(self) -> list[tuple[str, tuple]]:
        """[(kernel, grid)] in launch order."""
        return [(launch.kernel, launch.grid) for launch in self.launches]

    def table(self) -> str:
        """A plain-text line per kernel."""
        lines = [f"{'kernel':<24} {'launches':>8} {'programs':>9} {'loaded':>14} {'stored':>14}"]
        for name, tot in self.kernels().items():
            lines.append(f"{name:<24} {tot.launches:>8} {tot.programs:>9} "
                         f"{tot.bytes_loaded:>14,} {tot.bytes_stored:>14,}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- interpreter hooks

_ACTIVE: list[Traffic] = []
_HOOKS: dict = {}  # the interpreter's originals while hooks are installed
_CURRENT: dict = {}  # the launch being executed: "launch", "samples", "regions", "weight"


def _samples(size: int, programs: str) -> list[tuple[int, int]]:
    """[(program index, weight)] along one grid axis."""
    if programs == "none":
        return []
    if programs == "all" or size <= 3:
        return [(i, 1) for i in range(size)]
    return [(0, 1), (1, size - 2), (size - 1, 1)]


def _tensor_args(args, kwargs) -> list:
    """The tensors a launch is given, also those inside tuple arguments (the kernels' views)."""
    import torch

    found = []
    pending = list(args) + list(kwargs.values())
    while pending:
        arg = pending.pop()
        if isinstance(arg, (tuple, list)):
            pending.extend(arg)
            continue
        base = arg if isinstance(arg, torch.Tensor) else getattr(arg, "base", None)
        if isinstance(base, torch.Tensor):
            found.append(base)
    return found


def _regions(tensors):
    """(sorted storage starts, their ends, their keys) of the tensor arguments of a launch."""
    import numpy as np

    spans = {}
    for t in tensors:
        storage = t.untyped_storage()
        spans[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
    keys = sorted(spans)
    return (np.array(keys, dtype=np.uint64), np.array([spans[k] for k in keys], dtype=np.uint64),
            keys)


def _constexprs(executor, args, kwargs) -> dict:
    names = list(executor.arg_names)
    values = dict(zip(names, args), **kwargs)
    return {name: values[name] for name in executor.constexprs if name in values}


def _record(field_name: str, ptrs, mask):
    launch = _CURRENT.get("launch")
    if launch is None:
        return
    import numpy as np

    addresses = np.asarray(ptrs.data)
    lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
    addresses = addresses[lanes].astype(np.uint64, copy=False)
    if addresses.size == 0:
        return
    bits = ptrs.get_element_ty().primitive_bitwidth
    scale = max(1, bits // 8) * _CURRENT["weight"]
    starts, ends, keys = _CURRENT["regions"]
    slot = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
    inside = slot >= 0
    inside[inside] = addresses[inside] < ends[slot[inside]]
    by_storage = getattr(launch, field_name)
    for index, lanes_in in enumerate(np.bincount(slot[inside], minlength=len(keys))):
        if lanes_in:
            by_storage[keys[index]] += int(lanes_in) * scale
    outside = int(addresses.size - inside.sum())
    if outside:
        by_storage[None] += outside * scale


def _masked_load(ptrs, mask, *rest):
    _record("loaded", ptrs, mask)
    return _HOOKS["create_masked_load"](ptrs, mask, *rest)


def _masked_store(ptrs, value, mask, *rest):
    _record("stored", ptrs, mask)
    return _HOOKS["create_masked_store"](ptrs, value, mask, *rest)


def _set_grid_dim(nx, ny, nz):
    launch = _CURRENT.get("launch")
    # The interpreter loops over the sampled grid; the kernel sees the launch's real one.
    return _HOOKS["set_grid_dim"](*(launch.grid if launch is not None else (nx, ny, nz)))


def _set_grid_idx(x, y, z):
    samples = _CURRENT.get("samples")
    if samples is None:
        return _HOOKS["set_grid_idx"](x, y, z)
    picked = [axis[i] for axis, i in zip(samples, (x, y, z))]
    _CURRENT["weight"] = math.prod(weight for _, weight in picked)
    _CURRENT["launch"].programs_run += 1
    return _HOOKS["set_grid_idx"](*(index for index, _ in picked))


def _grid_call(executor, *args, **kwargs):
    import numpy as np

    if not _ACTIVE or _CURRENT:
        return _HOOKS["GridExecutor.__call__"](executor, *args, **kwargs)
    launch = Launch(kernel=executor.fn.__name__, constexprs=_constexprs(executor, args, kwargs),
                    ctas=int(kwargs.get("num_ctas", 1)))
    for traffic in _ACTIVE:
        traffic.launches.append(launch)
    programs = _ACTIVE[-1].programs
    full_grid = executor.grid

    def sampled_grid(meta):
        grid = full_grid(meta) if callable(full_grid) else full_grid
        launch.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        _CURRENT["samples"] = [_samples(size, programs) for size in launch.grid]
        return tuple(len(axis) for axis in _CURRENT["samples"])

    _CURRENT.update(launch=launch, regions=_regions(_tensor_args(args, kwargs)), weight=1)
    executor.grid = sampled_grid
    # Programs skipped by a sample leave garbage that later programs may compute with: the
    # values mean nothing then, so numpy's overflow warnings are silenced.
    quiet = np.errstate(all="ignore") if programs != "all" else contextlib.nullcontext()
    try:
        with quiet:
            return _HOOKS["GridExecutor.__call__"](executor, *args, **kwargs)
    finally:
        executor.grid = full_grid
        _CURRENT.clear()


_BUILDER_HOOKS = {"create_masked_load": _masked_load, "create_masked_store": _masked_store,
                  "set_grid_dim": _set_grid_dim, "set_grid_idx": _set_grid_idx}


def _install():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    for name, hook in _BUILDER_HOOKS.items():
        _HOOKS[name] = getattr(builder, name)  # bound originals; plain loads/stores call these
        setattr(builder, name, hook)
    _HOOKS["GridExecutor.__call__"] = interpreter.GridExecutor.__call__
    interpreter.GridExecutor.__call__ = _grid_call


def _uninstall():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    for name in _BUILDER_HOOKS:
        delattr(builder, name)  # the class's methods show through again
    interpreter.GridExecutor.__call__ = _HOOKS["GridExecutor.__call__"]
    _HOOKS.clear()


def interpreting() -> bool:
    """True when Triton kernels defined from now on run through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def count(programs: str = "all"):
    """Counts the launches, grids and bytes of the Triton kernels run inside the block.

    ``programs``: ``"all"`` (exact), ``"sample"`` (first, second and last program per axis,
    extrapolated) or ``"none"`` (grids only); see the module docstring. Blocks nest: an inner
    block's launches are also counted by the outer ones, run as the inner one says."""
    if programs not in PROGRAM_MODES:
        raise ValueError(f"programs must be one of {PROGRAM_MODES}, got {programs!r}")
    if not interpreting():
        raise RuntimeError("perf.traffic counts through Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    traffic = Traffic(programs)
    if not _ACTIVE:
        _install()
    _ACTIVE.append(traffic)
    try:
        yield traffic
    finally:
        _ACTIVE.remove(traffic)
        if not _ACTIVE:
            _uninstall()


def main(argv=None) -> int:
    """``python -m perf.traffic``: the per-shape-class table (see perf/traffic_report.py)."""
    if not interpreting():
        os.environ["TRITON_INTERPRET"] = "1"  # before perf.traffic_report imports triton
    from perf import traffic_report

    return traffic_report.main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
