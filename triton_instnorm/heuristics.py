"""Launch configuration: an analytical choice of tile shape and warps from the plane geometry.

Each kernel program owns ``BLOCK_R`` planes and walks them in tiles of ``BLOCK_HW`` elements.
A plane that fits one tile (``SINGLE_TILE``) is read from DRAM once and kept in registers; a
longer plane is streamed twice (statistics, then normalize), the second sweep backwards so that
it starts with the tiles most likely still in L2.

The thresholds below are first estimates from the register budget and the memory system, not
yet GPU measurements (perf/NOTES.md lists what is still to measure):
- ``MAX_SINGLE_TILE = 8192`` elements: 8 warps x 32 lanes hold 32 float32 values per lane for
  each live tile (x, the centered x, and y in the forward; x, dy, x_hat, dz in the backward),
  under the 255-register limit. Beyond that the kernel would spill.
- ``LOOP_TILE = 4096``: a streaming tile of 16 KiB (float32) per program keeps enough bytes in
  flight per SM to saturate HBM with ~2 resident programs per SM.
- ``SMALL_PLANE_TILE = 1024`` elements per program when several small planes share a program:
  one warp of 32 elements per lane, 2 KiB of bf16 (16 planes of 7x7). At 4096 (four warps)
  Triton 3.6 spills on 7x7 planes (the compiled bf16 forward, sm_90: 246 instructions per
  element and 888 bytes spilled, against 98 and none at 1024) and 3.9 issues more (7x7
  forward 54.0 against 51.0, backward 58.3 against 49.9; AdaIN's 32x32 planes, one per
  program: 20.2 against 19.8); the bytes are the same.
- Split planes (``split_chunks``): a plane that needs the streaming loop is split across
  programs only when there are too few programs to fill the GPU (fewer than
  ``PROGRAMS_PER_SM`` x SMs). Splitting costs two more launches (partial sums, then their
  combine) and turns the L2-friendly second sweep of the loop into a second DRAM read, so it
  only pays when SMs would otherwise idle. Each chunk adds ~46 bytes per plane (its partial
  sums written and read back once by the combine pass, the plane's statistics and parameters
  read by its normalize program): ``MIN_CHUNK_LEN = 8192`` elements (two loop tiles, 16 KiB of
  bf16 per pass) keeps that under 0.2% of the chunk's traffic while letting planes of 2^16
  elements and more reach 2 programs per SM. The statistics pass (``statistics_pass``) splits
  the planes further, into chunks of one tile of its own (``Config.chunk_tile``: one
  ``MAX_SINGLE_TILE`` of a contiguous plane), which it holds in registers, two reductions,
  where a stream of a few tiles pays its pivot, partial tile and lane combination for each
  (the compiled bf16 pass, sm_90: 10.9 instructions per element, against ~29 for a stream of
  two tiles; perf/results/sass.md, perf/NOTES.md). The normalize and backward passes keep the
  longer chunks: their loops carry no such cost, and their per-program code is amortized over
  more tiles (the channels_last split forward: 22.8 instructions per element in one-tile
  chunks, 8.4 in chunks of 7 tiles).
- Occupancy: several small planes share a program only while there are still
  ``PROGRAMS_PER_SM`` x SMs programs (2 per SM: one can stream while the other reduces).
- channels_last (rows contiguous, spatial stride C): a tile spans ``BLOCK_R`` channels at each
  spatial position, and those channels are the only contiguous run in memory. ``VECTOR_BYTES =
  16`` bytes of them (8 bf16, 4 fp32 channels) make one vector load per position and half a
  32-byte sector, whose other half the neighbouring program reads at the same time; fewer
  channels per program would multiply the sectors moved per useful byte. So a plane is kept in
  one tile only if that many channels fit with the whole plane; longer planes take 16-byte
  channel groups and split their spatial positions across programs (partial sums combined in a
  fixed order, as NHWC group norms do), at least one loop tile (``LOOP_TILE`` elements) per
  program. Only a tensor too small to fill the GPU that way gets fewer channels per program.
  Split, the statistics pass takes chunks of one tile of ``MAX_SINGLE_TILE`` elements (1024
  positions of 8 bf16 channels), unless the occupancy rule's chunks are ``STREAM_TILES = 12``
  loop tiles or longer: the compiled bf16 statistics pass (sm_90) takes 13.6 instructions per
  element for a full one-tile chunk, and (1891 + 266 k) / 32 k for a stream of k loop tiles
  (its pivot, lane combination and per-plane arithmetic once, 266 per tile; the count takes
  the partial tile's code as run), the same at k = 11 and fewer beyond.
- Clusters (``cluster_ctas``; NVIDIA sm_90+ with Triton >= 3.8, and only when
  ``TRITON_INSTNORM_CLUSTERS=1``: see device.py): a contiguous plane longer than one tile is still
  held on chip and read once when its tile is spread over a cluster of ``num_ctas`` CTAs, each
  holding ``MAX_SINGLE_TILE`` elements with 8 warps: every thread keeps the registers of the
  single-CTA tile, and the reductions cross the CTAs through distributed shared memory (64 bytes
  per CTA, 128 for float64). ``MAX_CLUSTER_CTAS = 8``, the portable cluster size (16 CTAs need
  the non-portable opt-in and a GPC with 16 free SMs, which can leave SMs idle): planes up to
  8 x 8192 = 65,536 elements are read once. The same ladder for 2- and 4-byte inputs and both
  directions, because the tile is held in the accumulation dtype whatever the input's (a kernel
  holding the input in its own dtype halves its ladder for float32): compiled for sm_90 and
  sm_100, those cluster variants take as many registers per thread as their single-CTA tiles,
  and spill nothing (tests/test_aot_devices.py). Not for float64, whose gelu backward spills on
  one CTA already and would in a cluster too. Not for
  channels_last: Triton's CTA planner spreads the tile's channel axis over the CTAs, so each CTA
  reads one channel with 2-byte loads strided by C instead of 16-byte channel vectors.
- Warps (``_warps``): at most ``LANE_ELEMENTS = 32`` elements per lane and live tile, between
  ``MIN_LANES = 32`` and ``MAX_LANES = 512`` lanes per CTA, counted in lanes, not warps: a
  64-lane AMD wavefront then gets half the warps of a 32-lane NVIDIA warp. 32 elements per lane
  (two or four 16-byte loads) rather than 16: what a program does once per thread (its planes'
  statistics, the reductions' shuffle trees, addresses) is then spread over twice the elements,
  which the compiled code shows as ~30% fewer instructions per element in the single-tile
  passes (perf/sass.py; perf/NOTES.md); the 8192-element tile takes 8 warps of 88-122 registers,
  so that two CTAs fit an SM, as the occupancy rule assumes. Tiles of 1024 elements or fewer
  take one warp.
- Devices: the SM count and warp size come from the GPU the tensor is on (device.py); without
  one from the emulated GPU (H100 unless ``TRITON_INSTNORM_EMULATE`` says otherwise).
"""

import math
import types
from dataclasses import dataclass

import torch

from .device import DEFAULT_EMULATED, EMULATED, Device
from .hooks import HOOKS, split_planes, tile_limit  # noqa: F401  (the tests' overrides)
from .kernels.constants import (
    ACT_NONE, FROM_PARTIALS, FROM_LOOP, FROM_RUNNING, FROM_TILE, NUM_FWD_PARTIALS, NUM_STATS,
    NUM_SUMS,
)

MAX_SINGLE_TILE = 8192  # elements per CTA held in registers
LOOP_TILE = 4096
SMALL_PLANE_TILE = 1024
# Planes per program when rows are contiguous in memory (channels_last): 32 rows of 2-byte
# elements make one 64-byte segment per spatial position.
CHANNELS_LAST_ROWS = 32

VECTOR_BYTES = 16  # one 128-bit load per lane

LANE_ELEMENTS = 32  # elements per lane and live tile, at most
MIN_LANES, MAX_LANES = 32, 512  # lanes per CTA: 1 and 16 warps of 32 lanes

MAX_CLUSTER_CTAS = 8  # the portable cluster size

PROGRAMS_PER_SM = 2
MIN_CHUNK_LEN = 8192
STREAM_TILES = 12  # channels_last: split chunks this many tiles long or longer are streamed
STATS_LANE_BYTES = 256  # of a one-tile chunk per lane in the statistics pass
MAX_CHUNKS = 1024  # chunks of one plane are combined in one [BLOCK_R, chunks] register tile
COMBINE_TILE = 2048  # partials per combine program


# Host integer arithmetic: triton.cdiv and triton.next_power_of_2 are constexpr functions in
# Triton 3.6 and 3.9, and each call costs ~10 us on the host.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _capped(limit: int) -> int:
    return limit if HOOKS.tile_limit is None else min(limit, HOOKS.tile_limit)


@dataclass(frozen=True)
class Config:
    BLOCK_R: int
    BLOCK_HW: int
    SINGLE_TILE: bool
    num_warps: int
    min_chunk_len: int = MIN_CHUNK_LEN  # elements of a plane per program when planes are split
    num_ctas: int = 1  # CTAs per program: > 1 holds the tile in a cluster
    # the chunks of a split plane's statistics pass, one tile each (statistics_pass); 0: the
    # pass takes the other passes' chunks (float64). Unless those are ``stream_len`` long or
    # longer (0: never)
    chunk_tile: int = 0
    stream_len: int = 0


def _warps(tile_elements: int, warp_size: int) -> int:
    """Warps of ``warp_size`` lanes for a CTA tile: ~LANE_ELEMENTS elements per lane."""
    lanes = min(max(tile_elements // LANE_ELEMENTS, MIN_LANES), MAX_LANES)
    return max(1, lanes // warp_size)


def _occupancy_rows(planes: int, sm_count: int) -> int:
    """The most planes per program (a power of two, at least 1) that still leaves
    PROGRAMS_PER_SM x SMs programs."""
    per_program = planes // (PROGRAMS_PER_SM * sm_count)
    return 1 if per_program < 1 else 1 << (per_program.bit_length() - 1)


def cluster_ctas(tile_elements: int, clusters: bool) -> int:
    """CTAs of the cluster that holds a tile too big for one CTA; 0 when none can."""
    ctas = cdiv(tile_elements, MAX_SINGLE_TILE)
    if not clusters or ctas > MAX_CLUSTER_CTAS or _capped(tile_elements) < tile_elements:
        return 0  # (a test's tile limit below the tile: no cluster either)
    return ctas


def plane_config(hw: int, rows_per_group: int, *, groups: int = 1, rows_contiguous: bool,
                 itemsize: int = 4, gpu: Device = EMULATED[DEFAULT_EMULATED],
                 clusters: bool = False) -> Config:
    """Tile shape for ``groups`` x ``rows_per_group`` planes of ``hw`` elements on ``gpu``.

    ``rows_contiguous``: neighbouring planes are adjacent in memory (channels_last), so a tile
    spans several planes at each spatial position instead of running along one plane.
    ``clusters``: a tile may be spread over a cluster of CTAs (device.cluster_launch).
    """
    single_cap = _capped(MAX_SINGLE_TILE)
    loop_cap = _capped(LOOP_TILE)
    small_cap = _capped(SMALL_PLANE_TILE)
    rows_p2 = next_power_of_2(max(rows_per_group, 1))
    hw_p2 = next_power_of_2(max(hw, 1))
    occupancy = _occupancy_rows(groups * rows_per_group, gpu.sms)

    def warps(tile):
        return _warps(tile, gpu.warp_size)

    if rows_contiguous:
        vector_rows = min(max(1, VECTOR_BYTES // itemsize), rows_p2, single_cap)
        most_rows = min(rows_p2, CHANNELS_LAST_ROWS, max(1, single_cap // hw_p2))
        if vector_rows * hw_p2 <= single_cap:
            # The whole plane in one tile, 16-byte channel vectors or more, unless the tensor is
            # too small to fill the GPU with them.
            block_r = min(most_rows, max(occupancy, 1))
            if occupancy >= vector_rows:
                block_r = max(block_r, vector_rows)
            return Config(block_r, hw_p2, True, warps(block_r * hw_p2))
        block_hw = max(1, loop_cap // vector_rows)
        # Split, the statistics pass takes chunks of one MAX_SINGLE_TILE, unless the occupancy
        # rule's are long enough for its stream to cost less (STREAM_TILES).
        chunk_tile = max(block_hw, single_cap // vector_rows // block_hw * block_hw)
        return Config(vector_rows, block_hw, False, warps(vector_rows * block_hw),
                      min_chunk_len=block_hw, chunk_tile=chunk_tile if itemsize <= 4 else 0,
                      stream_len=STREAM_TILES * block_hw)

    if hw_p2 <= single_cap:
        # Small planes are packed several per program while the GPU stays filled.
        block_r = max(1, min(small_cap // hw_p2, rows_p2, occupancy))
        return Config(block_r, hw_p2, True, warps(block_r * hw_p2))
    ctas = cluster_ctas(hw_p2, clusters and itemsize <= 4)
    if ctas:
        return Config(1, hw_p2, True, warps(MAX_SINGLE_TILE), num_ctas=ctas)
    # Split, the statistics pass takes chunks of one MAX_SINGLE_TILE: a tile's two reductions
    # instead of a stream's pivot, partial tile and lane combination, which chunks of a few loop
    # tiles cannot amortize (statistics_pass).
    chunk_tile = single_cap // loop_cap * loop_cap if itemsize <= 4 else 0
    return Config(1, loop_cap, False, warps(loop_cap), chunk_tile=chunk_tile)


def split_chunks(hw: int, row_programs: int, cfg: Config, sm_count: int) -> int:
    """Chunks each plane of ``hw`` elements is split into across programs (grid axis 1); 1: no
    split. Enough chunks for PROGRAMS_PER_SM x SMs programs, each at least ``cfg.min_chunk_len``
    elements of its planes; the kernels derive the chunk length from this count (whole tiles,
    ``chunk_length``)."""
    if cfg.SINGLE_TILE:
        return 1  # the plane is read once from registers: splitting would add a read
    if HOOKS.chunk_len is not None:
        chunk_len = max(cfg.BLOCK_HW, HOOKS.chunk_len // cfg.BLOCK_HW * cfg.BLOCK_HW)
    else:
        target = PROGRAMS_PER_SM * sm_count
        if row_programs >= target:
            return 1
        want = cdiv(target, row_programs)
        chunk_len = max(cfg.min_chunk_len, hw // want // cfg.BLOCK_HW * cfg.BLOCK_HW)
    chunk_len = max(chunk_len, cdiv(hw, MAX_CHUNKS * cfg.BLOCK_HW) * cfg.BLOCK_HW)
    return cdiv(hw, chunk_len)


def chunk_length(hw: int, chunks: int, block_hw: int) -> int:
    """Elements of each chunk of a plane split in ``chunks`` (the last may have fewer), as the
    kernels derive it (``_chunk_len``): whole tiles of ``block_hw``."""
    return cdiv(cdiv(hw, chunks), block_hw) * block_hw


def statistics_pass(p: "Problem", cfg: Config, chunks: int, warp_size: int):
    """(chunks, options) of a split plane's statistics pass (``_fwd_split_stats``), the plane
    split in ``chunks`` for the other passes.

    Its chunks: one tile of ``cfg.chunk_tile`` elements each, unless the others' are already no
    longer, or ``cfg.stream_len`` or longer (those are streamed), or the test hooks set the
    chunk length; at most MAX_CHUNKS.
    TILE_HW: the width of the one tile each chunk fits in (at most ``cfg.chunk_tile``, else
    one loop tile), which then takes a tile's two reductions; 0: the chunks are streamed (and
    always for float64, whose tests pin the stream's rounding to the last ulps, and which has
    instructions to spare).
    FULL: every chunk is exactly that tile and every program's planes all exist (rows per group
    a multiple of BLOCK_R): the tile is loaded and reduced with no mask, which the compiled
    code shows as one select and one predicate fewer per element (contiguous bf16: 10.9
    instructions per element against 13.3).
    LANE_PLANES: a channels_last tile is loaded two planes per lane (4 or 8 bytes at a
    position) instead of a 16-byte vector of 8 or 4, so that each lane reduces 2 planes: the
    reductions across lanes and the per-plane arithmetic after them, done by every lane for
    each plane it holds, shrink 4-fold for 4 times the loads (the compiled bf16 pass, sm_90:
    1001 instructions per lane against 1381, full tiles).
    num_warps: one tile holds the chunk and nothing else (no output, no activation), 256 bytes
    of it per lane (``STATS_LANE_BYTES``: 128 bf16 or 64 float32 elements; compiled for sm_90
    and sm_100, at most 240 registers and no spill), so that the reductions and the per-plane
    arithmetic are spread over 4 (2) times the elements of a 32-element lane (contiguous bf16:
    8.8 instructions per element against 10.9 at 64 per lane; channels_last, 8 x 1024: 13.6
    against 16.6); a stream keeps ``cfg.num_warps`` (32 elements per lane: its lanes' running
    statistics, per position a lane holds, would grow with the elements, and its loop reduces
    nothing across lanes)."""
    chunk_len = chunk_length(p.hw, chunks, cfg.BLOCK_HW)
    streamed = cfg.stream_len and chunk_len >= cfg.stream_len
    if cfg.chunk_tile and chunk_len > cfg.chunk_tile and not streamed and HOOKS.chunk_len is None:
        chunks = min(cdiv(p.hw, cfg.chunk_tile), MAX_CHUNKS)
        chunk_len = chunk_length(p.hw, chunks, cfg.BLOCK_HW)
    if p.dtype.itemsize > 4 or chunk_len > max(cfg.chunk_tile, cfg.BLOCK_HW):
        return chunks, dict(TILE_HW=0, num_warps=cfg.num_warps)
    tile_hw = next_power_of_2(chunk_len)
    full = (tile_hw == chunk_len and p.hw % chunk_len == 0
            and p.rows_per_group % cfg.BLOCK_R == 0)
    lane_planes = 2 if p.rows_contiguous and cfg.BLOCK_R > 2 else 0
    lanes = cfg.BLOCK_R * tile_hw * p.dtype.itemsize // STATS_LANE_BYTES
    lanes = min(max(lanes, MIN_LANES), MAX_LANES)
    return chunks, dict(TILE_HW=tile_hw, FULL=full, LANE_PLANES=lane_planes,
                        num_warps=max(1, lanes // warp_size))


# ------------------------------------------------------------------------------- the launch plan
# One pure function (``plan``) turns a problem and a GPU into every pass of a call: its kernel,
# grid, constexprs and launch options, and the buffers the call allocates. launch.py executes
# plans; explain.py prints them; the tests and the AOT specs read them.

FORWARD, BACKWARD, STATS_BACKWARD, UPDATE = "forward", "backward", "stats_backward", "update"
# the passes for planes held in parts (distributed.py)
NORMALIZE, BACKWARD_SUMS, BACKWARD_FROM_SUMS = "normalize", "backward_sums", "backward_from_sums"


@dataclass(frozen=True)
class Problem:
    """What a call's plan depends on: the op, the planes (as launch.layout sees the tensors:
    ``groups`` x ``rows_per_group`` planes of ``hw`` elements, ``rows_contiguous`` for
    channels_last), the input dtype and the flags that change the passes."""

    op: str
    n: int
    c: int
    hw: int
    groups: int = 1
    rows_per_group: int = 0
    rows_contiguous: bool = False
    dtype: object = torch.float32
    use_input_stats: bool = True
    store_stats: bool = False  # forward: the caller reads the statistics
    write_y: bool = True  # forward: False computes the statistics only
    residual: bool = False
    activation: int = ACT_NONE
    reduce_dw: bool = False  # backward: dweight / dbias summed over n (per-channel, needed)
    reduce_db: bool = False

    @property
    def acc(self):
        return torch.float64 if self.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Buffer:
    """A buffer the call allocates: ``like`` an operand (an output laid out as it is), or of
    ``shape`` and ``dtype``."""

    name: str
    shape: tuple | None
    dtype: object
    like: str | None = None


@dataclass(frozen=True)
class Pass:
    """One launch: ``args`` name what the host gives (tensors, views, runtime scalars);
    ``options`` hold what the plan decides (constexprs, sizes, num_warps, num_ctas)."""

    kernel: str
    grid: tuple
    args: tuple  # (kernel argument, the host's name for its value)
    options: types.MappingProxyType

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclass(frozen=True)
class Plan:
    """Every pass of one call in launch order, and the buffers it allocates."""

    problem: Problem
    gpu: Device
    config: Config | None  # the tile of the passes over planes (None: per-channel passes only)
    chunks: int  # of each plane, grid axis 1
    source: int | None  # FROM_*: where the passes over planes take their per-plane reductions
    path: str  # "single tile", "cluster", "looped", "split", "elementwise", "per channel"
    buffers: tuple
    passes: tuple


def _pass(kernel, grid, args, **options):
    """A Pass; ``args``: argument names, or (argument, the host's name for its value)."""
    args = tuple((a, a) if isinstance(a, str) else a for a in args)
    return Pass(kernel, tuple(grid), args, types.MappingProxyType(options))


_FWD_ARGS = ("x", "y", "r", "w", "b", "running", "Stats", "eps", "slope", "EXACT")
_BWD_ARGS = ("x", "dy", "r", "w", "b", "Stats", "eps", "slope")


def plan(problem: Problem, gpu: Device = EMULATED[DEFAULT_EMULATED],
         clusters: bool = False) -> Plan:
    """The plan of ``problem`` on ``gpu`` (``clusters``: device.cluster_launch); pure, but for
    the test hooks (``tile_limit``, ``split_planes``), which callers key their caches on."""
    p, acc = problem, problem.acc
    if p.op == UPDATE:
        update = _reduce_pass(p, "_update_running_stats", ("Stats", "running", "momentum"),
                              HW=p.hw)
        return Plan(p, gpu, None, 1, None, "per channel", (), (update,))
    cfg = plane_config(p.hw, p.rows_per_group, groups=p.groups, rows_contiguous=p.rows_contiguous,
                       itemsize=p.dtype.itemsize, gpu=gpu, clusters=clusters)
    row_programs = p.groups * cdiv(p.rows_per_group, cfg.BLOCK_R)
    chunks = split_chunks(p.hw, row_programs, cfg, gpu.sms)
    source = FROM_PARTIALS if chunks > 1 else FROM_TILE if cfg.SINGLE_TILE else FROM_LOOP
    grid, planes = (row_programs, chunks), p.n * p.c
    tiles = dict(geometry=(planes, p.c, p.hw, p.rows_per_group), BLOCK_R=cfg.BLOCK_R,
                 BLOCK_HW=cfg.BLOCK_HW, num_warps=cfg.num_warps)
    if cfg.num_ctas > 1:
        tiles["num_ctas"] = cfg.num_ctas
    split = source == FROM_PARTIALS
    buffers, passes = [], []
    if p.op in (FORWARD, NORMALIZE):
        if p.op == NORMALIZE:
            source = FROM_PARTIALS  # the statistics are given
        elif not p.use_input_stats:
            source = FROM_RUNNING
        split = p.op == FORWARD and source == FROM_PARTIALS
        buffers += [Buffer("y", None, p.dtype, "x")] if p.write_y else []
        if p.op == FORWARD and (p.store_stats or split):  # split planes combine through Stats
            buffers.append(Buffer("Stats", (NUM_STATS, p.n, p.c), acc))
        if split:
            stats_chunks, options = statistics_pass(p, cfg, chunks, gpu.warp_size)
            buffers.append(Buffer("Partials", (NUM_FWD_PARTIALS, planes, stats_chunks), acc))
            passes.append(_pass("_fwd_split_stats", (row_programs, stats_chunks),
                                ("x", "Partials"), **dict(tiles, **options)))
            passes.append(_combine_pass("_fwd_combine", planes, stats_chunks, gpu,
                                        ("Partials", "Stats"), HW=p.hw, BLOCK_HW=cfg.BLOCK_HW))
        if p.write_y or not split:  # else the statistics are complete
            passes.append(_pass("_fwd", grid, _FWD_ARGS, **tiles, STATS_FROM=source,
                                ACTIVATION=p.activation))
    elif p.op in (BACKWARD, BACKWARD_SUMS, BACKWARD_FROM_SUMS):
        flags = dict(USE_INPUT_STATS=p.use_input_stats, ACTIVATION=p.activation)
        if p.op == BACKWARD_FROM_SUMS:
            source, split = FROM_PARTIALS, False  # the sums are given
        if p.op != BACKWARD_SUMS:
            buffers.append(Buffer("dx", None, p.dtype, "x"))
            buffers += [Buffer("dr", None, p.dtype, "r")] if p.residual else []
        if p.op == BACKWARD:
            buffers.append(Buffer("PlaneSums", (NUM_SUMS, planes), acc))
        if split or p.op == BACKWARD_SUMS:
            buffers.append(Buffer("Partials", (NUM_SUMS, planes, chunks), acc))
            passes.append(_pass("_bwd_split_sums", grid, (*_BWD_ARGS, "Partials"), **tiles,
                                **flags))
            if chunks > 1:
                if p.op == BACKWARD_SUMS:
                    buffers.append(Buffer("PlaneSums", (NUM_SUMS, planes), acc))
                passes.append(_combine_pass("_bwd_combine", planes, chunks, gpu,
                                            ("Partials", "PlaneSums")))
        if p.op != BACKWARD_SUMS:
            if p.hw and planes:  # else a part with no element of its planes
                sums = ("PlaneSums", "KernelSums" if p.op == BACKWARD_FROM_SUMS else "PlaneSums")
                passes.append(_pass("_bwd", grid, (*_BWD_ARGS, "dx", "dr", sums), **tiles,
                                    **flags, SUMS_FROM=source))
            if (p.reduce_dw or p.reduce_db) and p.c:
                buffers += [Buffer(name, None, None, like) for name, like, needed in (
                    ("DW", "w", p.reduce_dw), ("DB", "b", p.reduce_db)) if needed]
                passes.append(_reduce_pass(p, "_sum_partials_over_n", ("PlaneSums", "DW", "DB")))
    elif p.op == STATS_BACKWARD:  # elementwise: chunks are just more programs
        buffers.append(Buffer("dx", None, p.dtype, "x"))
        passes.append(_pass("_stats_bwd", grid, ("x", "dx", "dmean", "dstd", "Stats", "eps"),
                            **tiles, CHUNKED=chunks > 1))
    else:
        raise ValueError(f"unknown op {p.op!r}")
    return Plan(p, gpu, cfg, chunks, source, _path(p, cfg, source, chunks), tuple(buffers),
                tuple(passes))


def _combine_pass(kernel, planes, chunks, gpu, args, **options):
    """A combine pass: the (fields, N * C, chunks) partials of split planes reduced over the
    chunks, the chunks of BLOCK_R planes in one register tile of at most COMBINE_TILE partials
    (128 lanes x 16 values)."""
    block_chunks = next_power_of_2(chunks)
    block_r = max(1, min(next_power_of_2(planes), COMBINE_TILE // block_chunks))
    return _pass(kernel, (cdiv(planes, block_r),), args, num_planes=planes, chunks=chunks,
                 **options, BLOCK_R=block_r, BLOCK_CHUNKS=block_chunks,
                 num_warps=_warps(COMBINE_TILE, gpu.warp_size))


def _reduce_pass(p, kernel, args, **options):
    """A pass over (N, C) per-plane values (running stats, dweight / dbias), a block of at most
    1024 channels per program."""
    block = min(1024, next_power_of_2(max(p.c, 1)))
    return _pass(kernel, (cdiv(p.c, block),), args, N=p.n, C=p.c, **options, BLOCK_C=block)


def _path(p, cfg, source, chunks) -> str:
    """How the planes are read (explain.py says which threshold decided it)."""
    if source == FROM_RUNNING or p.op in (STATS_BACKWARD, NORMALIZE, BACKWARD_FROM_SUMS):
        return "elementwise"  # the per-plane values are given, or the pass needs none
    if cfg.num_ctas > 1:
        return "cluster"
    return "single tile" if cfg.SINGLE_TILE else "split" if chunks > 1 else "looped"
