"""Bytes loaded and stored, and programs launched, by Triton kernels, counted through Triton's
interpreter on the CPU (``TRITON_INTERPRET=1`` set before triton is first imported)::

    from perf import traffic
    with traffic.count() as t:
        y = triton_instnorm.instance_norm(x)
    t.loaded(x), t.stored(y), t.moved()   # bytes: of one tensor's storage, or in all
    t.launches                            # [Launch(kernel, grid, programs_run, ...)], in order
    print(t.table())                      # a line per kernel

``python -m perf.traffic`` counts every shape class of perf/shapes.py this way, forward and
backward, in bfloat16 and float32, with the launch configuration the host plans without a CUDA
device (for an emulated GPU, an H100 unless ``TRITON_INSTNORM_EMULATE`` names another), and
writes ``perf/results/traffic.md``: per launch its grid, programs per SM (a cluster launch's
CTAs), how many times x (and dy) were read, and bytes moved over the minimum of perf/model.py.
``--clusters`` counts triton_instnorm_clusters instead (cluster launches on) into
``perf/results/traffic_clusters.md``; ``--providers`` counts any provider of perf/providers.py
whose kernels are Triton kernels.

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

import argparse
import contextlib
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

from perf import cli, model, shapes, summary

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
    if not cli.interpreting():
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


# --------------------------------------------------------------------------- python -m perf.traffic

TABLE_PATH = os.path.join(cli.RESULTS_DIR, "traffic.md")
CLUSTER_TABLE_PATH = os.path.join(cli.RESULTS_DIR, "traffic_clusters.md")
DTYPES = ["bfloat16", "float32"]
DEFAULT_PROVIDERS = ["triton_instnorm"]  # eager PyTorch and torch.compile launch no Triton kernel


def emulated_gpu() -> tuple[str, int]:
    """(name, SMs) of the GPU the host plans launches for without a CUDA device."""
    from triton_instnorm.device import emulated

    gpu = emulated()
    return gpu.name, gpu.sms


def measure(shape_class, shape, dtype: str, provider: str, programs: str) -> list[dict]:
    """Rows (forward, backward) of one (shape, dtype, provider)."""
    import torch

    from perf import providers

    case = providers.make_case(shape, dtype, shape_class.memory_format, torch.device("cpu"))
    fn, inputs = providers.norm_fn(provider, case)
    with count(programs) as fwd:
        y = fn(*inputs)
    with count(programs) as bwd:
        torch.autograd.grad(y, inputs, case.dy)
    rows = []
    for direction, counted, read in (("forward", fwd, (case.x,)),
                                     ("backward", bwd, (case.x, case.dy))):
        minimum = model.norm_bytes(shape, dtype, direction)
        rows.append({
            "shape_class": shape_class.name, "shape": model.shape_to_str(shape), "dtype": dtype,
            "direction": direction, "provider": provider,
            "launches": ", ".join(f"{lc.kernel} {lc.grid_text()}"
                                  + (f" ({lc.ctas}-CTA clusters)" if lc.ctas > 1 else "")
                                  for lc in counted.launches),
            "programs": max((lc.programs * lc.ctas for lc in counted.launches), default=0),
            "reads": [counted.loaded(t) / (t.numel() * t.element_size()) for t in read],
            "ratio": counted.moved() / minimum if counted.launches else None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=cli.csv_list(shapes.SHAPE_CLASSES),
                   help="comma-separated shape classes (default: all)")
    p.add_argument("--dtypes", type=cli.csv_list(model.DTYPES), default=DTYPES,
                   help=f"comma-separated (default {','.join(DTYPES)})")
    p.add_argument("--providers", type=cli.csv_list(), default=DEFAULT_PROVIDERS,
                   help="comma-separated providers of perf/providers.py (default %(default)s)")
    p.add_argument("--programs", choices=("sample", "all"), default="sample",
                   help="programs run per launch (default %(default)s; the grid is always real)")
    p.add_argument("--smoke", action="store_true", help="the classes' tiny smoke shapes instead")
    p.add_argument("--clusters", action="store_true",
                   help="count triton_instnorm_clusters (TRITON_INSTNORM_CLUSTERS=1) instead")
    p.add_argument("--out", help=f"markdown file (default {cli.show(TABLE_PATH)}, with --clusters "
                                 f"{cli.show(CLUSTER_TABLE_PATH)})")
    args = p.parse_args(argv)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # counted through the interpreter, GPU or not
    import torch
    import triton

    from perf import providers

    gpu_name, sms = emulated_gpu()
    config = f"launch configuration of a {sms}-SM {gpu_name}"
    if args.clusters:
        why = providers.clusters_reason(torch.empty(0))
        if why:
            raise SystemExit(f"perf.traffic --clusters: {why}")
        args.providers = [providers.CLUSTERS if p == providers.OURS else p for p in args.providers]
        config += ", cluster launches on (TRITON_INSTNORM_CLUSTERS=1)"
    args.out = args.out or (CLUSTER_TABLE_PATH if args.clusters else TABLE_PATH)
    rows, failures, start = [], [], time.monotonic()
    for cls in shapes.select_classes(args.classes):
        for shape in cls.smoke_shapes if args.smoke else cls.shapes:
            for dtype in args.dtypes:
                for provider in args.providers:
                    label = f"{cls.name} {model.shape_to_str(shape)} {dtype} {provider}"
                    try:
                        rows += measure(cls, shape, dtype, provider, args.programs)
                    except Exception as exc:  # a provider that is not installed or cannot run
                        failures.append(f"{label}: {type(exc).__name__}: {exc}")
                        continue
                    print(f"{time.monotonic() - start:7.1f}s {label}", file=sys.stderr, flush=True)
    notes = [f"torch {torch.__version__}, triton {triton.__version__}, Triton interpreter on the "
             f"CPU; {config}",
             f"programs run per launch: {args.programs}" + (
                 " (first, second and last per grid axis; the grid is the real one)"
                 if args.programs == "sample" else "")]
    notes += ["smoke shapes: tiny, not the perf classes' sizes"] if args.smoke else []
    notes += [f"not counted: {f}" for f in failures]
    text = summary.traffic(rows, args.providers, notes, gpu_name, sms)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
