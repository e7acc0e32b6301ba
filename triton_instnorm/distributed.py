"""Instance norm of DTensors (``torch.distributed.tensor``), sharded along any dim.

How a DTensor reaches this module: every layer (``instance_norm``, the modules, converted models,
torch's modules under ``enabled()``, AdaIN) computes through the operators of ``ops.py``. A
DTensor argument sends an operator call to DTensor's dispatch, which finds the rule registered
here for that operator and DTensor (``torch.library.register_torch_dispatch``, PyTorch's open
registration of an operator's behaviour for a tensor subclass). A sharding strategy
(``register_sharding``) only maps placements for a computation that stays local, so it cannot
normalize a plane split across devices; a rule can run collectives. The rules are registered the
first time a DTensor reaches an entry point (``functional.register_dtensor_rules``): the package
does not import this module, which imports ``torch.distributed.tensor`` (half a second).

What each placement of the input, per mesh dim, costs:

- ``Shard(0)`` (batch), ``Shard(1)`` (channels), ``Replicate``: each device holds whole planes,
  so it runs the operator on its shard, with no communication. Per-channel weight, bias and
  running statistics are taken sharded with the channels and whole otherwise (redistributed if
  they are not: a local slice, or a gather of C values). The gradient of a weight is ``Partial``
  where the batch is split (a sum over devices, reduced when used, as torch's own operators do).
  The running statistics average over the whole batch, as torch's single-process update does:
  where the batch is split, the update gathers the statistics of every plane first (4 values
  per plane; the update then is the single-process kernel's, bit for bit).
- ``Shard(d)``, d >= 2 (spatial, uneven splits included): each device takes its part of every
  plane through the statistics pass (pivot, scale, mean, variance: the ``Stats`` buffer), one
  all-gather of those and of the part's element count (4 values per plane, float64) over the
  mesh dim combines them per plane with Chan's formula for (count, mean, M2), in rank order
  (every device gets the same bits), and each device normalizes its part with the combined
  statistics. The backward combines the two per-plane sums (sum(dz * x_hat), sum(dz)) the same
  way, one all-gather of 2 values per plane. The output keeps the input's placements; the tensor
  is never gathered. In eval mode (running statistics) the forward is elementwise: no
  communication, and weight gradients are ``Partial`` over the spatial split.

The statistics buffer is laid out (NUM_STATS, N, C), so its shards follow the input's: the
batch split shards its dim 1, the channel split its dim 2, and a spatially split input's
combined statistics are replicated. A ``Partial`` input (a sum not yet reduced) or a placement
other than ``Shard`` and ``Replicate`` raises NotImplementedError; a tensor argument that is
not a DTensor next to one that is raises RuntimeError, as DTensor's operators do.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from . import launch, ops, parts
from .kernels import constants

# The kernels' threshold for scaling deviations (kernels/moments.py): beyond it a^2 could
# overflow float32, so the combined statistics are taken in units of a power of two.
_BIG_SPREAD = 2.0 ** 40

_registered = False

# torch.distributed's all-gather into one tensor: named all_gather_single from torch 2.13 on
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def register_rules(t) -> None:
    """Registers the operators' DTensor rules when ``t`` is the first DTensor to come by."""
    global _registered
    if _registered or not isinstance(t, DTensor):
        return
    for op, rule in ((ops.forward_op, _forward), (ops.backward_op, _backward),
                     (ops.update_running_stats_op, _update_running_stats),
                     (ops.plane_stats_op, _plane_stats),
                     (ops.stats_backward_op, _stats_backward)):
        op.register_torch_dispatch(DTensor, rule)
    _registered = True


# --- placements -----------------------------------------------------------------------------------

def _sharding(x):
    """(mesh, placements, spatial mesh dims) of the input ``x``, or the error for what is not
    supported."""
    for p in x.placements:
        if isinstance(p, Partial):
            raise NotImplementedError(
                f"triton_instnorm: instance norm of a DTensor with a Partial placement (a sum "
                f"not yet reduced) is not supported; got placements {tuple(x.placements)}. "
                f"Redistribute it first, e.g. x.redistribute(placements=[Replicate()]).")
        if type(p) not in (Shard, Replicate):
            raise NotImplementedError(
                f"triton_instnorm: instance norm of a DTensor supports Shard and Replicate "
                f"placements; got {tuple(x.placements)}")
    spatial = tuple(i for i, p in enumerate(x.placements) if _shards(p) and p.dim >= 2)
    return x.device_mesh, tuple(x.placements), spatial


def _shards(p, dim=None) -> bool:
    return isinstance(p, Shard) and (dim is None or p.dim == dim)


def _stats_placements(placements):
    """The (NUM_STATS, N, C) statistics' placements for an input placed as ``placements``."""
    return tuple(Shard(p.dim + 1) if _shards(p) and p.dim < 2 else Replicate()
                 for p in placements)


def _per_plane_placements(placements):
    """The placements of an (N, C) per-plane tensor (AdaIN's mean and std)."""
    return tuple(Shard(p.dim) if _shards(p) and p.dim < 2 else Replicate() for p in placements)


def _param_placements(placements, p):
    """Where the kernels need a (C,) or per-sample (N, C) / (1, C) parameter: sharded with the
    input's channels, with its batch (per-sample ones), whole otherwise."""
    def one(pl):
        if _shards(pl, 1):
            return Shard(p.dim() - 1)
        if _shards(pl, 0) and p.dim() == 2 and p.shape[0] > 1:
            return Shard(0)
        return Replicate()
    return tuple(one(pl) for pl in placements)


def _grad_placements(placements, p, spatial_summed: bool):
    """A parameter gradient's placements: those the kernels took the parameter in
    (_param_placements), but ``Partial`` (a sum over devices, reduced when used) where a whole
    parameter met different planes or parts of planes on each device: the batch split, and the
    spatial split unless the per-plane sums were combined."""
    def one(pl, q):
        split = _shards(pl, 0) or (_shards(pl) and pl.dim >= 2 and not spatial_summed)
        return Partial() if split and isinstance(q, Replicate) else q
    return tuple(one(pl, q) for pl, q in zip(placements, _param_placements(placements, p)))


def _local(t, mesh, placements=None):
    """The local tensor of the DTensor ``t`` placed as ``placements`` (redistributed if not;
    as it is placed if None)."""
    if t is None:
        return None
    if not isinstance(t, DTensor):
        raise RuntimeError(
            "triton_instnorm: got mixed torch.Tensor and DTensor arguments; make every tensor "
            "argument a DTensor (torch.distributed.tensor.distribute_module replicates a "
            "module's parameters and buffers)")
    if t.device_mesh != mesh:
        raise RuntimeError("triton_instnorm: DTensor arguments on different device meshes")
    if placements is not None and tuple(t.placements) != tuple(placements):
        t = t.redistribute(mesh, placements)
    return t.to_local()


def _wrap(local, mesh, placements, shape):
    """``local`` as a DTensor of global ``shape`` (contiguous)."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def _wrap_like(local, x, x_local):
    """An output of the kernels, laid out like ``x_local`` (or contiguous), as a DTensor placed
    like ``x``."""
    stride = x.stride() if local.stride() == x_local.stride() else None
    if stride is None:
        return _wrap(local, x.device_mesh, x.placements, x.shape)
    return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape,
                              stride=stride)




def _bind(func, args, kwargs):
    """An operator call's arguments by name (its schema's)."""
    bound = dict(zip((a.name for a in func._schema.arguments), args))
    bound.update(kwargs)
    return bound


# --- combining the parts of each plane --------------------------------------------------------

def _part_statistics(x, eps: float):
    """(Stats of the part of each plane that ``x`` holds, its element count)."""
    n, c = x.shape[0], x.shape[1]
    count = math.prod(x.shape[2:])
    if x.numel() == 0:  # a part with no elements: any statistics, counted 0 times
        stats = torch.zeros((constants.NUM_STATS, n, c), dtype=launch.acc_dtype(x.dtype),
                            device=x.device)
        stats[constants.INV_SCALE] = 1.0
        return stats, count
    _, stats = launch.forward(x, None, None, None, None, use_input_stats=True, eps=eps,
                              activation=constants.ACT_NONE, negative_slope=0.0,
                              store_stats=True, write_y=False)
    return stats, count


def _all_gather(t, mesh, mesh_dim):
    """(group size, *t.shape): ``t`` of every device along ``mesh_dim``, in rank order."""
    size = mesh.size(mesh_dim)
    out = t.new_empty(size * t.numel())  # flat: gloo takes no other shape
    _all_gather_single(out, t.contiguous().view(-1), group=mesh.get_group(mesh_dim))
    return out.view(size, *t.shape)


def combine_statistics(stats, count: int, mesh, mesh_dims):
    """The statistics of whole planes from those of their parts on the devices along
    ``mesh_dims``: one all-gather of (NUM_STATS values per plane, the count) in float64 per mesh
    dim, merged in rank order by Chan's formula. Every device gets the same bits."""
    merged = stats.double().reshape(constants.NUM_STATS, -1)
    counts = torch.full((1,), float(count), dtype=torch.float64, device=stats.device)
    for mesh_dim in mesh_dims:
        gathered = _all_gather(torch.cat([merged.reshape(-1), counts]), mesh, mesh_dim)
        parts = gathered[:, :-1].view(gathered.shape[0], constants.NUM_STATS, -1)
        merged, counts = _chan_merge(parts, gathered[:, -1], stats.dtype)
    return merged.to(stats.dtype).view_as(stats)


def _chan_merge(parts, counts, acc):
    """Stats fields (float64) of whole planes and their count, from (parts, NUM_STATS, planes)
    Stats fields and (parts,) counts.

    A part's mean is its PIVOT + MEAN / INV_SCALE, its M2 = VAR * count / INV_SCALE^2. The merge
    runs in units of the smallest INV_SCALE (the widest part's), keeps the mean as the first
    part's pivot plus an offset (never the difference of two large numbers), and ends as the
    kernels do: the pivot is the mean rounded to ``acc`` (x - pivot is then exact near the
    mean), and the units shrink by a power of two where the spread would overflow a^2."""
    pivot, inv_scale, mean, var = parts.unbind(1)
    scale = inv_scale.amin(0)
    ratio = scale / inv_scale
    offsets, m2s = mean * ratio, var * ratio * ratio * counts[:, None]
    center, offset, m2, count = pivot[0], offsets[0], m2s[0], counts[0]
    for r in range(1, parts.shape[0]):  # rank order: deterministic
        total = count + counts[r]
        weight = counts[r] / total
        delta = (pivot[r] - center) * scale + (offsets[r] - offset)
        first = count == 0  # nothing merged yet: take the part as it is
        center = torch.where(first, pivot[r], center)
        offset = torch.where(first, offsets[r], offset + delta * weight)
        m2 = torch.where(first, m2s[r], m2 + m2s[r] + delta * delta * (count * weight))
        count = total
    var = m2 / count
    spread = var.sqrt()
    shrink = torch.where(spread > _BIG_SPREAD, torch.exp2(-torch.ceil(torch.log2(spread))), 1.0)
    scale, offset, var = scale * shrink, offset * shrink, var * shrink * shrink
    rounded = (center + offset / scale).to(acc).double()
    rest = (center - rounded) * scale + offset
    return torch.stack([rounded, scale, rest, var]), count.reshape(1)


def combine_sums(plane_sums, mesh, mesh_dims):
    """The backward's per-plane sums of whole planes: one all-gather of NUM_SUMS values per
    plane (accumulation dtype) per mesh dim, summed in rank order in float64. Every device gets
    the same bits."""
    for mesh_dim in mesh_dims:
        gathered = _all_gather(plane_sums, mesh, mesh_dim).double()
        total = gathered[0]
        for part in gathered[1:]:
            total = total + part
        plane_sums = total.to(plane_sums.dtype)
    return plane_sums


# --- the rules ------------------------------------------------------------------------------

def _local_params(bound, mesh, placements, names):
    return {name: (None if bound[name] is None else
                   _local(bound[name], mesh, _param_placements(placements, bound[name])))
            for name in names}


def _forward(cls, func, types, args, kwargs):
    """triton_instnorm::forward of a DTensor: (y placed like x, statistics)."""
    a = _bind(func, args, kwargs)
    x = a["x"]
    mesh, placements, spatial = _sharding(x)
    local = dict(a, x=x.to_local(), **_local_params(a, mesh, placements, ("weight", "bias")))
    if a.get("residual") is not None:  # added elementwise: placed as x
        local["residual"] = _local(a["residual"], mesh, placements)
    running = ("running_mean", "running_var")
    if a["use_input_stats"]:  # not read: the update has its own rule
        local.update({k: _local(a[k], mesh) for k in running})
    else:
        local.update(_local_params(a, mesh, placements, running))
    x_local = local["x"]
    if spatial and a["use_input_stats"]:
        stats, count = _part_statistics(x_local, a["eps"])
        stats = combine_statistics(stats, count, mesh, spatial)
        y = (parts.normalize(x_local, local["weight"], local["bias"], stats, a["eps"],
                             a["activation"], a["negative_slope"], local.get("residual"))
             if x_local.numel() else torch.empty_like(launch.kernel_layout(x_local)))
    elif x_local.numel() == 0:  # no whole plane here (or no element in them)
        y = torch.empty_like(launch.kernel_layout(x_local))
        stats = x_local.new_zeros((constants.NUM_STATS, *x_local.shape[:2]),
                                  dtype=launch.acc_dtype(x.dtype))
    else:  # whole planes: the operator itself, on the local shard
        y, stats = func(**local)
    y = _wrap_like(y, x, x_local)
    return y, _wrap(stats, mesh, _stats_placements(placements),
                    (constants.NUM_STATS, *x.shape[:2]))


def _backward(cls, func, types, args, kwargs):
    """triton_instnorm::backward of a DTensor: (dx placed like x, dweight, dbias, dresidual
    placed like x)."""
    a = _bind(func, args, kwargs)
    x = a["x"]
    mesh, placements, spatial = _sharding(x)
    local = dict(a, x=x.to_local(), dy=_local(a["dy"], mesh, placements),
                 stats=_local(a["stats"], mesh, _stats_placements(placements)),
                 **_local_params(a, mesh, placements, ("weight", "bias")))
    if a.get("residual") is not None:
        local["residual"] = _local(a["residual"], mesh, placements)
    x_local = local["x"]
    summed = bool(spatial) and a["use_input_stats"]
    if summed:
        names = ("dy", "x", "weight", "bias", "stats", "use_input_stats", "eps", "activation",
                 "negative_slope")
        residual = local.get("residual")
        sums = parts.backward_sums(*(local[k] for k in names), residual=residual)
        sums = combine_sums(sums, mesh, spatial)
        dx, dw, db, dres = parts.backward_from_sums(
            *(local[k] for k in names[:5]), sums, math.prod(x.shape[2:]),
            *(local[k] for k in names[5:]), need_dw=a["need_dw"], need_db=a["need_db"],
            residual=residual)
    elif x_local.numel() == 0:
        dx = torch.empty_like(launch.kernel_layout(x_local))
        dw, db = (_empty_grad(local[k], a[need], x_local)
                  for k, need in (("weight", "need_dw"), ("bias", "need_db")))
        residual = local.get("residual")
        dres = x_local.new_empty((0,)) if residual is None else torch.empty_like(residual)
    else:
        dx, dw, db, dres = func(**local)
    grads = []
    for g, name, need in ((dw, "weight", "need_dw"), (db, "bias", "need_db")):
        p = a[name]
        if p is None or not a[need]:  # the operator's empty placeholder
            grads.append(_wrap(g, mesh, tuple(Replicate() for _ in placements), g.shape))
        else:
            grads.append(_wrap(g, mesh, _grad_placements(placements, p, summed), p.shape))
    if a.get("residual") is None:  # the operator's empty placeholder
        dres = _wrap(dres, mesh, tuple(Replicate() for _ in placements), dres.shape)
    else:
        dres = _wrap_like(dres, a["residual"], local["residual"])
    return (_wrap_like(dx, x, x_local), *grads, dres)


def _empty_grad(p, needed, x):
    """The gradient of a parameter from a shard with no element: zeros (its share of a sum), or
    the operator's placeholder where it is not needed."""
    if not needed or p is None:
        return x.new_empty((0,), dtype=launch.acc_dtype(x.dtype))
    return torch.zeros_like(p)


def _update_running_stats(cls, func, types, args, kwargs):
    """triton_instnorm::update_running_stats of DTensors: the statistics are taken where the
    running statistics are (gathered over a split batch), then the single-process update."""
    a = _bind(func, args, kwargs)
    running_mean, running_var, stats = a["running_mean"], a["running_var"], a["stats"]
    mesh = stats.device_mesh
    running_mean, running_var = _local(running_mean, mesh), _local(running_var, mesh)  # checks
    placements = tuple(a["running_mean"].placements)
    if (tuple(a["running_var"].placements) != placements
            or any(not (isinstance(p, Replicate) or _shards(p, 0)) for p in placements)):
        raise NotImplementedError(
            "triton_instnorm: running statistics of a DTensor input must be DTensors, both "
            "Replicate or Shard(0) along each mesh dim; got "
            f"{a['running_mean'].placements} and {a['running_var'].placements}")
    target = tuple(Shard(2) if _shards(p, 0) else Replicate() for p in placements)
    stats = _local(stats, mesh, target)
    local = dict(a, stats=stats, running_mean=running_mean, running_var=running_var,
                 n=stats.shape[1], c=stats.shape[2])
    if stats.numel():
        func(**local)


def _plane_stats(cls, func, types, args, kwargs):
    """triton_instnorm::plane_stats of a DTensor: (mean, std, statistics) of whole planes."""
    a = _bind(func, args, kwargs)
    x = a["x"]
    mesh, placements, spatial = _sharding(x)
    x_local = x.to_local()
    if spatial or x_local.numel() == 0:
        stats, count = _part_statistics(x_local, a["eps"])
        if spatial:
            stats = combine_statistics(stats, count, mesh, spatial)
        mean, std = ops._mean_std(stats, a["eps"])
    else:
        mean, std, stats = func(**dict(a, x=x_local))
    per_plane = _per_plane_placements(placements)
    return (_wrap(mean, mesh, per_plane, x.shape[:2]), _wrap(std, mesh, per_plane, x.shape[:2]),
            _wrap(stats, mesh, _stats_placements(placements),
                  (constants.NUM_STATS, *x.shape[:2])))


def _stats_backward(cls, func, types, args, kwargs):
    """triton_instnorm::stats_backward of a DTensor: dx placed like x, elementwise on each part
    (the kernel averages over its part's length: the incoming gradients are rescaled to the
    whole plane's)."""
    a = _bind(func, args, kwargs)
    x = a["x"]
    mesh, placements, _ = _sharding(x)
    per_plane = _per_plane_placements(placements)
    x_local = x.to_local()
    local = dict(a, x=x_local, dmean=_local(a["dmean"], mesh, per_plane),
                 dstd=_local(a["dstd"], mesh, per_plane),
                 stats=_local(a["stats"], mesh, _stats_placements(placements)))
    if x_local.numel() == 0:
        return _wrap_like(torch.empty_like(launch.kernel_layout(x_local)), x, x_local)
    part = math.prod(x_local.shape[2:]) / math.prod(x.shape[2:])
    if part != 1.0:
        local["dmean"], local["dstd"] = local["dmean"] * part, local["dstd"] * part
    return _wrap_like(func(**local), x, x_local)
