"""Host side of the kernels: views of the tensors as planes, buffers, and the launches.

Nothing here synchronizes with the device or branches on device values, so every call can be
captured in a CUDA graph. ``LAUNCHES`` counts the kernel launches per kernel name: tests use it
to prove that the Triton kernels (and not an eager fallback) produced a result.
"""

import collections
import struct
from dataclasses import dataclass

import torch
import triton

from . import heuristics
from .kernels import (
    _bwd, _bwd_split_dx, _bwd_split_sums, _fwd, _fwd_split_normalize, _fwd_split_stats,
    _sum_partials_over_n, _update_running_stats,
)

LAUNCHES = collections.Counter()

NUM_STATS = 5  # rows of the statistics buffer: pivot, inv_scale, mean_a, std_a, var_a


def split_float(v: float):
    """(hi, lo) float32-representable with hi + lo == v to ~48 bits: float64 scalars for Triton,
    whose float arguments are float32."""
    v = float(v)
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return v, 0.0
    lo = v - hi if (hi - hi) == 0 else 0.0  # hi finite
    return hi, lo


def new_output(like: torch.Tensor) -> torch.Tensor:
    """Output buffer shaped and laid out like ``like`` (tests patch this to poison outputs)."""
    return torch.empty_like(like)


def new_buffer(like: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Scratch buffer on ``like``'s device (tests patch this to poison it)."""
    return like.new_empty(shape, dtype=dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Planes:
    """A (N, C, *spatial) tensor seen as groups of planes: element (g, r, s) at
    g * sg + r * sr + s * ss, with groups * rows_per_group == N * C, row = g * rows_per_group + r."""

    groups: int
    rows_per_group: int
    hw: int
    sg: int
    sr: int
    ss: int


def _spatial_stride(t: torch.Tensor):
    """Stride of the flattened spatial dims, or None if they cannot be flattened in place."""
    ss = None
    expected = None
    for size, stride in reversed(list(zip(t.shape[2:], t.stride()[2:]))):
        if size == 1:
            continue
        if ss is None:
            ss, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return 1 if ss is None else ss


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its spatial dims flatten to one stride, else a contiguous copy."""
    return t if _spatial_stride(t) is not None else t.contiguous()


def can_fold(t: torch.Tensor) -> bool:
    """True when the batch dim folds into the channels: plane (n, c) at row n * C + c, one stride."""
    n, c = t.shape[0], t.shape[1]
    return c == 1 or n == 1 or t.stride(0) == c * t.stride(1)


def planes(t: torch.Tensor, fold: bool) -> Planes:
    """``t`` as planes; ``fold`` (see can_fold) must be the same for tensors read side by side."""
    n, c = t.shape[0], t.shape[1]
    hw = 1
    for s in t.shape[2:]:
        hw *= s
    ss = _spatial_stride(t)
    sn, sc = t.stride(0), t.stride(1)
    if not fold:
        return Planes(n, c, hw, sn, sc, ss)
    if c == 1:  # rows are the batch entries
        return Planes(1, n, hw, 0, sn, ss)
    return Planes(1, n * c, hw, 0, sc, ss)


def param_strides(p, n_batch: int):
    """(stride over n, stride over c) of a per-channel (C,) or per-sample (N, C) / (1, C) tensor."""
    if p is None:
        return 0, 0
    if p.dim() == 1:
        return 0, p.stride(0)
    return (p.stride(0) if p.shape[0] == n_batch and n_batch > 1 else 0), p.stride(1)


def _config_and_grid(pl: Planes):
    cfg = heuristics.plane_config(pl.hw, pl.rows_per_group, rows_contiguous=(pl.sr == 1 and pl.hw > 1))
    blocks = triton.cdiv(pl.rows_per_group, cfg.BLOCK_R)
    return cfg, blocks, (pl.groups * blocks,)


_SM_COUNTS = {}


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (cached); an H100's 132 for the interpreter."""
    if not t.is_cuda:
        return heuristics.ASSUMED_SMS
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def _device_guard(t: torch.Tensor):
    return torch.cuda.device_of(t) if t.is_cuda else _NullGuard()


class _NullGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def forward(x, weight, bias, running_mean, running_var, use_input_stats: bool, eps: float,
            activation: int, negative_slope: float, store_stats: bool, write_y: bool = True):
    """y and the (NUM_STATS, N * C) statistics (an empty tensor unless ``store_stats``).
    ``write_y=False`` computes the statistics only (y is then an empty placeholder)."""
    x = kernel_layout(x)
    y = new_output(x) if write_y else x.new_empty((0,))
    n, c = x.shape[0], x.shape[1]
    acc = acc_dtype(x.dtype)
    stats = new_buffer(x, (NUM_STATS, n * c) if store_stats else (0,), acc)
    fold = can_fold(x) and (not write_y or can_fold(y))
    px = planes(x, fold)
    py = planes(y, fold) if write_y else px
    cfg, blocks, grid = _config_and_grid(px)
    w_sn, w_sc = param_strides(weight, n)
    b_sn, b_sc = param_strides(bias, n)
    rv_stride = running_mean.stride(0) if running_mean is not None else 0
    eps_hi, eps_lo = split_float(eps)
    slope_hi, slope_lo = split_float(negative_slope)
    chunks, chunk = heuristics.split_chunks(px.hw, grid[0], cfg, sm_count(x))
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=store_stats,
                 WRITE_Y=write_y, ACTIVATION=activation, BLOCK_R=cfg.BLOCK_R,
                 BLOCK_HW=cfg.BLOCK_HW, num_warps=cfg.num_warps)
    with _device_guard(x):
        if chunks == 1:
            _fwd[grid](
                x, y, weight, bias, running_mean, running_var, stats,
                n * c, c, px.rows_per_group, blocks, px.hw,
                px.sg, px.sr, px.ss, py.sg, py.sr, py.ss,
                w_sn, w_sc, b_sn, b_sc, rv_stride,
                eps_hi, eps_lo, slope_hi, slope_lo,
                USE_INPUT_STATS=use_input_stats, SINGLE_TILE=cfg.SINGLE_TILE, **flags,
            )
            LAUNCHES["_fwd"] += 1
            return y, stats
        split_grid = (grid[0], chunks)
        partials = stats
        if use_input_stats:
            partials = new_buffer(x, (3, n * c, chunks), acc)
            _fwd_split_stats[split_grid](
                x, partials, n * c, c, px.rows_per_group, blocks, px.hw, chunk,
                px.sg, px.sr, px.ss,
                BLOCK_R=cfg.BLOCK_R, BLOCK_HW=cfg.BLOCK_HW, num_warps=cfg.num_warps,
            )
            LAUNCHES["_fwd_split_stats"] += 1
        _fwd_split_normalize[split_grid](
            x, y, weight, bias, running_mean, running_var, stats, partials,
            n * c, c, px.rows_per_group, blocks, px.hw, chunk,
            px.sg, px.sr, px.ss, py.sg, py.sr, py.ss,
            w_sn, w_sc, b_sn, b_sc, rv_stride,
            eps_hi, eps_lo, slope_hi, slope_lo,
            USE_INPUT_STATS=use_input_stats, BLOCK_CHUNKS=triton.next_power_of_2(chunks), **flags,
        )
    LAUNCHES["_fwd_split_normalize"] += 1
    return y, stats


def update_running_stats(stats, running_mean, running_var, n: int, c: int, hw: int, momentum: float):
    block = heuristics.reduce_block(c)
    mom_hi, mom_lo = split_float(momentum)
    with _device_guard(stats):
        _update_running_stats[(triton.cdiv(c, block),)](
            stats, running_mean, running_var, n, c, hw, running_mean.stride(0),
            mom_hi, mom_lo, BLOCK_C=block,
        )
    LAUNCHES["_update_running_stats"] += 1


def backward(dy, x, weight, bias, stats, use_input_stats: bool, activation: int,
             negative_slope: float, need_dw: bool, need_db: bool):
    """(dx, dweight, dbias); dweight / dbias have the parameter's shape, or are empty when not needed."""
    x = kernel_layout(x)
    dy = kernel_layout(dy)
    dx = new_output(x)
    n, c = x.shape[0], x.shape[1]
    acc = stats.dtype
    dw_partial = new_buffer(x, (n, c), acc)
    db_partial = new_buffer(x, (n, c), acc)
    fold = can_fold(x) and can_fold(dy) and can_fold(dx)
    px, pdy, pdx = planes(x, fold), planes(dy, fold), planes(dx, fold)
    cfg, blocks, grid = _config_and_grid(px)
    w_sn, w_sc = param_strides(weight, n)
    b_sn, b_sc = param_strides(bias, n)
    slope_hi, slope_lo = split_float(negative_slope)
    chunks, chunk = heuristics.split_chunks(px.hw, grid[0], cfg, sm_count(x))
    strides = (px.sg, px.sr, px.ss, pdy.sg, pdy.sr, pdy.ss)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACTIVATION=activation,
                 BLOCK_R=cfg.BLOCK_R, BLOCK_HW=cfg.BLOCK_HW, num_warps=cfg.num_warps)
    with _device_guard(x):
        if chunks == 1:
            _bwd[grid](
                x, dy, dx, weight, bias, stats, dw_partial, db_partial,
                n * c, c, px.rows_per_group, blocks, px.hw,
                *strides, pdx.sg, pdx.sr, pdx.ss,
                w_sn, w_sc, b_sn, b_sc, slope_hi, slope_lo,
                USE_INPUT_STATS=use_input_stats, SINGLE_TILE=cfg.SINGLE_TILE, **flags,
            )
            LAUNCHES["_bwd"] += 1
        else:
            split_grid = (grid[0], chunks)
            partials = new_buffer(x, (2, n * c, chunks), acc)
            _bwd_split_sums[split_grid](
                x, dy, weight, bias, stats, partials,
                n * c, c, px.rows_per_group, blocks, px.hw, chunk,
                *strides, w_sn, w_sc, b_sn, b_sc, slope_hi, slope_lo, **flags,
            )
            _bwd_split_dx[split_grid](
                x, dy, dx, weight, bias, stats, partials, dw_partial, db_partial,
                n * c, c, px.rows_per_group, blocks, px.hw, chunk,
                *strides, pdx.sg, pdx.sr, pdx.ss,
                w_sn, w_sc, b_sn, b_sc, slope_hi, slope_lo,
                USE_INPUT_STATS=use_input_stats, BLOCK_CHUNKS=triton.next_power_of_2(chunks),
                **flags,
            )
            LAUNCHES["_bwd_split_sums"] += 1
            LAUNCHES["_bwd_split_dx"] += 1
    dw = _param_grad(dw_partial, weight, need_dw, n)
    db = _param_grad(db_partial, bias, need_db, n)
    _reduce_partials(dw_partial, db_partial, dw, db, weight, bias, need_dw, need_db, n, c)
    return dx, dw, db


def _per_channel(p, n: int) -> bool:
    return p.dim() == 1 or p.shape[0] != n or n == 1


def _param_grad(partial, p, needed: bool, n: int):
    if not needed or p is None:
        return partial.new_empty((0,))
    if _per_channel(p, n):
        return new_buffer(p, p.shape, p.dtype)
    return partial.to(p.dtype)  # per-sample parameters: the partials are the gradient


def _reduce_partials(dw_partial, db_partial, dw, db, weight, bias, need_dw, need_db, n, c):
    do_dw = need_dw and weight is not None and _per_channel(weight, n)
    do_db = need_db and bias is not None and _per_channel(bias, n)
    if not (do_dw or do_db):
        return
    block = heuristics.reduce_block(c)
    with _device_guard(dw_partial):
        _sum_partials_over_n[(triton.cdiv(c, block),)](
            dw_partial, db_partial, dw if do_dw else dw_partial, db if do_db else db_partial,
            n, c, HAS_DW=do_dw, HAS_DB=do_db, BLOCK_C=block,
        )
    LAUNCHES["_sum_partials_over_n"] += 1
