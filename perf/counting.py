"""Bytes loaded and stored, and programs launched, by Triton kernels, counted through Triton's
interpreter on the CPU (``TRITON_INTERPRET=1`` set before triton is first imported)::

    from perf import counting
    with counting.count() as t:
        y = triton_instnorm.instance_norm(x)
    t.loaded(x), t.stored(y), t.moved()   # bytes: of one tensor's storage, or in all
    t.launches                            # [Launch(kernel, grid, programs_run, ...)], in order
    print(t.table())                      # a line per kernel

``python -m perf.traffic`` counts the perf shape classes this way into a table.

What is counted, per launch:

- bytes: every load and store the interpreter executes (``tl.load`` / ``tl.store``, scalar or
  block, masked or not), unmasked lanes only, times the pointer's element size, attributed to the
  tensor argument whose storage each lane falls in (views of one storage count together). Lanes,
  not distinct addresses: an element loaded twice counts twice, which is what a second sweep
  costs when the cache does not hold it. No cache, atomics or tensor descriptors are modelled.
- programs: the launch's grid, every axis, also when no program is run.

How: inside ``count()`` the interpreter builder's ``create_masked_load`` / ``_store`` (which plain
loads and stores call too) and ``set_grid_dim`` / ``_idx`` are wrapped, and
``GridExecutor.__call__`` records each launch's kernel and tensor arguments; nothing depends on
argument names (triton 3.6 and 3.9).

``count(programs=...)``: ``"all"`` programs run (exact); ``"sample"``: per grid axis the first,
second and last, the second standing for every interior one (exact when interior programs move
the same bytes, as in every launch of these kernels; full-size shapes in seconds; the skipped
programs' outputs stay unwritten); ``"none"``: grids only.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

from perf import machine

PROGRAM_MODES = ("all", "sample", "none")


@dataclass
class Launch:
    """One kernel launch. ``loaded`` / ``stored``: bytes by the storage address of a tensor
    argument (None: lanes outside every tensor argument)."""

    kernel: str
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


class Traffic:
    """What one ``count()`` block launched; filled in while the block runs."""

    def __init__(self, programs: str):
        self.programs = programs
        self.launches: list[Launch] = []

    def _select(self, field_name: str, tensor) -> int:
        key = None if tensor is None else tensor.untyped_storage().data_ptr()
        return sum(sum(by_storage.values()) if tensor is None else by_storage.get(key, 0)
                   for by_storage in (getattr(launch, field_name) for launch in self.launches))

    def loaded(self, tensor=None) -> int:
        """Bytes loaded from ``tensor``'s storage (None: in all)."""
        return self._select("loaded", tensor)

    def stored(self, tensor=None) -> int:
        """Bytes stored into ``tensor``'s storage (None: in all)."""
        return self._select("stored", tensor)

    def moved(self, tensor=None) -> int:
        return self.loaded(tensor) + self.stored(tensor)

    def grids(self) -> list[tuple[str, tuple]]:
        """[(kernel, grid)] in launch order."""
        return [(launch.kernel, launch.grid) for launch in self.launches]

    def kernels(self) -> dict[str, list[int]]:
        """{kernel: [launches, programs, bytes loaded, bytes stored]}, in order of first launch."""
        totals = {}
        for launch in self.launches:
            row = totals.setdefault(launch.kernel, [0, 0, 0, 0])
            for i, value in enumerate((1, launch.programs, launch.bytes_loaded,
                                       launch.bytes_stored)):
                row[i] += value
        return totals

    def table(self) -> str:
        """A plain-text line per kernel: launches, programs, bytes loaded and stored."""
        lines = [f"{'kernel':<24} {'launches':>8} {'programs':>9} {'loaded':>14} {'stored':>14}"]
        lines += [f"{name:<24} {n:>8} {programs:>9} {loaded:>14,} {stored:>14,}"
                  for name, (n, programs, loaded, stored) in self.kernels().items()]
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
    launch = Launch(kernel=executor.fn.__name__, ctas=int(kwargs.get("num_ctas", 1)))
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


@contextlib.contextmanager
def count(programs: str = "all"):
    """Counts the launches, grids and bytes of the Triton kernels run inside the block. Blocks
    nest: an inner block's launches are also counted by the outer ones, run as the inner says."""
    if programs not in PROGRAM_MODES:
        raise ValueError(f"programs must be one of {PROGRAM_MODES}, got {programs!r}")
    if not machine.interpreting():
        raise RuntimeError("perf.counting counts through Triton's interpreter: set "
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
