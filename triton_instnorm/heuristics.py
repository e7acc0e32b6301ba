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
- Split planes (``split_chunks``): a plane that needs the streaming loop is split across
  programs only when there are too few programs to fill the GPU (fewer than
  ``PROGRAMS_PER_SM`` x SMs). Splitting costs a second launch and turns the L2-friendly second
  sweep of the loop into a second DRAM read, so it only pays when SMs would otherwise idle.
  ``MIN_CHUNK = 16384`` elements keeps >= 32 KiB (bf16) streamed per program per pass.
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

PROGRAMS_PER_SM = 2
MIN_CHUNK = 16384
MAX_CHUNKS = 1024  # chunks of one plane are combined in one [BLOCK_R, chunks] register tile
ASSUMED_SMS = 132  # without a CUDA device (the interpreter): model an H100

_tile_limit = None  # test hook: cap on elements per tile, to force the looped paths
_chunk_override = None  # test hook: force a split with this many elements per chunk


@contextlib.contextmanager
def _override(name: str, value):
    old = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = old


def tile_limit(elements: int):
    """Caps the tile size (for tests: makes small planes take the multi-tile loops)."""
    return _override("_tile_limit", elements)


def split_planes(chunk_elements: int):
    """Forces planes longer than one tile to be split in chunks of this size (for tests)."""
    return _override("_chunk_override", chunk_elements)


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


def split_chunks(hw: int, row_programs: int, cfg: Config, sm_count: int) -> tuple[int, int]:
    """(number of chunks, elements per chunk) for planes of ``hw`` elements; (1, hw): no split."""
    if cfg.SINGLE_TILE:
        return 1, hw  # the plane is read once from registers: splitting would add a read
    if _chunk_override is not None:
        chunk = max(cfg.BLOCK_HW, _chunk_override // cfg.BLOCK_HW * cfg.BLOCK_HW)
    else:
        target = PROGRAMS_PER_SM * sm_count
        if row_programs >= target:
            return 1, hw
        want = triton.cdiv(target, row_programs)
        chunk = max(MIN_CHUNK, triton.cdiv(hw, want))
        chunk = triton.cdiv(chunk, cfg.BLOCK_HW) * cfg.BLOCK_HW
    chunk = max(chunk, triton.cdiv(hw, MAX_CHUNKS * cfg.BLOCK_HW) * cfg.BLOCK_HW)
    chunks = triton.cdiv(hw, chunk)
    return (chunks, chunk) if chunks > 1 else (1, hw)


def reduce_block(c: int) -> int:
    """Channels per program of the tiny (N, C) reductions (running stats, dweight/dbias)."""
    return min(1024, triton.next_power_of_2(max(c, 1)))
