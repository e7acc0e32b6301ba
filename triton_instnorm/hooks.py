"""The test hooks of the launch plan (heuristics.py reads them; tests set them through
``heuristics.tile_limit`` / ``heuristics.split_planes``): plans are cached with them in the key."""

import contextlib
import dataclasses
from dataclasses import dataclass


@dataclass
class Overrides:
    """Overrides for tests, set through ``tile_limit`` / ``split_planes``. A plain object, not a
    context variable: the backward of a CUDA tensor runs on autograd's device thread, which must
    see what the test set."""

    tile_limit: int | None = None  # cap on elements per tile, to force the looped paths
    chunk_len: int | None = None  # force a split with chunks of this many elements


HOOKS = Overrides()


@contextlib.contextmanager
def _override(**values):
    old = dataclasses.replace(HOOKS)
    for name, value in values.items():
        setattr(HOOKS, name, value)
    try:
        yield
    finally:
        for field in dataclasses.fields(HOOKS):
            setattr(HOOKS, field.name, getattr(old, field.name))


def tile_limit(elements: int):
    """Caps the tile size (for tests: makes small planes take the multi-tile loops)."""
    return _override(tile_limit=elements)


def split_planes(chunk_len: int):
    """Forces planes longer than one tile to be split in chunks of this size (for tests)."""
    return _override(chunk_len=chunk_len)
