"""Launch configuration: an analytical choice of tile shape and warps from the plane geometry.

Each kernel program owns ``BLOCK_R`` planes and walks them in tiles of ``BLOCK_HW`` elements.
A plane that fits one tile (``SINGLE_TILE``) is read from DRAM once and kept in registers; a
longer plane is streamed twice (statistics, then normalize), the second sweep mostly from L2.

The thresholds below are first estimates from the register budget, not yet GPU measurements
(no GPU was available when they were written; see perf/NOTES.md for what is still to measure):
- ``MAX_SINGLE_TILE = 8192`` elements: 16 warps x 32 lanes hold 16 float32 values per lane for
  each live tile (x, the centered x, and y in the forward; x, dy, x_hat, dz in the backward),
  well under the 255-register limit. Beyond that the kernel would spill.
- ``LOOP_TILE = 4096``: a streaming tile of 16 KiB (float32) per program keeps enough bytes in
  flight per SM to saturate HBM with ~2 resident programs per SM.
- ``SMALL_PLANE_TILE = 4096`` elements per program when several small planes share a program,
  so that a program still moves >= 8 KiB of bf16 (tiny planes are otherwise launch-bound).
"""

import contextlib
from dataclasses import dataclass

import triton

MAX_SINGLE_TILE = 8192
LOOP_TILE = 4096
SMALL_PLANE_TILE = 4096
# Planes per program when rows are contiguous in memory (channels_last): 32 rows of 2-byte
# elements make one 64-byte segment per spatial position.
CHANNELS_LAST_ROWS = 32

_tile_limit = None  # test hook: cap on elements per tile, to force the looped paths


@contextlib.contextmanager
def tile_limit(elements: int):
    """Caps the tile size (for tests: makes small planes take the multi-tile loops)."""
    global _tile_limit
    old, _tile_limit = _tile_limit, elements
    try:
        yield
    finally:
        _tile_limit = old


@dataclass(frozen=True)
class Config:
    BLOCK_R: int
    BLOCK_HW: int
    SINGLE_TILE: bool
    num_warps: int


def _warps(tile_elements: int) -> int:
    # ~16 elements per lane at most: 4 warps up to 2K elements, 8 up to 4K, 16 above.
    if tile_elements <= 2048:
        return 4
    if tile_elements <= 4096:
        return 8
    return 16


def plane_config(hw: int, rows_per_group: int, rows_contiguous: bool) -> Config:
    """Tile shape for planes of ``hw`` elements, ``rows_per_group`` planes side by side.

    ``rows_contiguous``: neighbouring planes are adjacent in memory (channels_last), so a tile
    spans several planes at each spatial position instead of running along one plane.
    """
    single_cap = MAX_SINGLE_TILE if _tile_limit is None else min(MAX_SINGLE_TILE, _tile_limit)
    loop_cap = LOOP_TILE if _tile_limit is None else min(LOOP_TILE, _tile_limit)
    small_cap = SMALL_PLANE_TILE if _tile_limit is None else min(SMALL_PLANE_TILE, _tile_limit)
    rows_p2 = triton.next_power_of_2(max(rows_per_group, 1))
    hw_p2 = triton.next_power_of_2(max(hw, 1))

    if rows_contiguous:
        block_r = min(rows_p2, CHANNELS_LAST_ROWS, single_cap)
        if block_r * hw_p2 <= single_cap:
            return Config(block_r, hw_p2, True, _warps(block_r * hw_p2))
        block_hw = max(1, loop_cap // block_r)
        return Config(block_r, block_hw, False, _warps(block_r * block_hw))

    if hw_p2 <= single_cap:
        # Small planes are packed several per program; large ones get a program each.
        block_r = max(1, min(small_cap // hw_p2, rows_p2))
        return Config(block_r, hw_p2, True, _warps(block_r * hw_p2))
    return Config(1, loop_cap, False, _warps(loop_cap))


def reduce_block(c: int) -> int:
    """Channels per program of the tiny (N, C) reductions (running stats, dweight/dbias)."""
    return min(1024, triton.next_power_of_2(max(c, 1)))
