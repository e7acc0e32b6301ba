"""Instance norm of DTensors sharded along every dim, on real process groups (see
test_distributed.py): each result against torch on the whole tensor, in float64 and in float32
with adversarial planes, with the collectives counted.

Each rank builds the same whole tensors from seeds, shards them, runs our layer, and compares
``full_tensor()`` of the outputs, input / weight / bias gradients and running statistics with
torch's functional on the whole tensor (float64). The collectives each call makes are recorded
(``Collectives``): what the batch and channel splits do without communication, and the bytes a
spatial split exchanges, per plane, against the whole tensor that torch's own DTensor path
gathers.
"""

import pytest
import torch
import torch.nn.functional as F
from test_distributed import World
from torch.utils._python_dispatch import TorchDispatchMode
from utils import DEVICE, TOL, grad_tol  # utils first: TRITON_INTERPRET before triton

import triton_instnorm as tin
from triton_instnorm import heuristics
from triton_instnorm.kernels import constants

F64, F32 = torch.float64, torch.float32


@pytest.fixture(scope="module")
def world2():
    world = World(2)
    yield world
    world.stop()


@pytest.fixture(scope="module")
def world3():
    world = World(3)
    yield world
    world.stop()


# --- what a call communicates -------------------------------------------------------------------

# The collectives of c10d (what torch.distributed calls) whose input, what this rank sends, is
# their second argument, and the others; then the functional collectives (DTensor's), input first.
_INPUT_SECOND = {"_allgather_base_", "allgather_", "allgather_coalesced_",
                 "allgather_into_tensor_coalesced_", "_reduce_scatter_base_", "reduce_scatter_",
                 "reduce_scatter_tensor_coalesced_", "alltoall_base_", "alltoall_", "gather_",
                 "scatter_"}
_COLLECTIVES = _INPUT_SECOND | {
    "allreduce_", "allreduce_coalesced_", "broadcast_", "reduce_",
    "all_gather_into_tensor", "all_gather_into_tensor_coalesced", "all_reduce",
    "all_reduce_coalesced", "all_to_all_single", "broadcast", "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced"}


def _nbytes(arg):
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


class Collectives(TorchDispatchMode):
    """Records each collective this rank takes part in (c10d's, and the functional collectives
    DTensor uses), as (name, bytes this rank sends into it)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor's dispatch first: its collectives then pass here
        name = func._opname
        if func.namespace in ("c10d", "_c10d_functional") and name in _COLLECTIVES:
            self.calls.append((name, _nbytes(args[1] if name in _INPUT_SECOND else args[0])))
        return func(*args, **(kwargs or {}))


# --- one case: our layer on shards against torch on the whole tensor --------------------------

def _data(shape, dtype, seed, adversarial=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    if adversarial:  # planes whose parts differ by 1e4, a mean 1e4 with spread 1e-2, constant
        half = shape[2] // 2
        x[0, 0, half:] += 1e4
        x[0, 1] = 1e4 + 1e-2 * x[0, 1]
        x[1, 0] = 3.0
    return x.to(dtype)


def _placed(t, mesh, placements, requires_grad=False):
    from torch.distributed.tensor import distribute_tensor

    # a copy: a replicated DTensor would otherwise hold ``t`` itself, updated in place
    return distribute_tensor(t.to(DEVICE, copy=True), mesh, placements).requires_grad_(
        requires_grad)


def _case(mesh, shape, placements, dtype=F64, *, param_placements=None, activation="leaky_relu",
          training=True, adversarial=False, eps=1e-5, residual=False):
    """Our instance norm on ``placements`` against torch on the whole tensor (with
    ``residual``, a skip tensor placed like x added before the activation); returns the
    collectives of the forward and of the backward."""
    from torch.distributed.tensor import Replicate

    c = shape[1]
    x = _data(shape, dtype, 1, adversarial)
    dy = _data(shape, dtype, 2)
    w, b = _data((c,), dtype, 3), _data((c,), dtype, 4)
    rm, rv = _data((c,), dtype, 5), _data((c,), dtype, 6).abs()
    param_placements = param_placements or [Replicate()] * len(placements)
    xs = _placed(x, mesh, placements, True)
    ws, bs = (_placed(t, mesh, param_placements, True) for t in (w, b))
    rms, rvs = (_placed(t, mesh, param_placements) for t in (rm, rv))
    skip = _data(shape, dtype, 9) if residual else None
    skips = _placed(skip, mesh, placements, True) if residual else None
    with Collectives() as forward:
        y = tin.instance_norm(xs, rms, rvs, ws, bs, use_input_stats=training, momentum=0.3,
                              eps=eps, activation=activation, residual=skips)
    dys = _placed(dy, mesh, placements)
    with Collectives() as backward:
        y.backward(dys)
    assert tuple(y.placements) == tuple(placements) and tuple(xs.grad.placements) == tuple(
        placements)

    # torch on the whole tensor, float64
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    rmr, rvr = rm.double().clone(), rv.double().clone()
    yr = F.instance_norm(xr, rmr, rvr, wr, br, use_input_stats=training, momentum=0.3, eps=eps)
    skipr = skip.double().requires_grad_() if residual else None
    yr = yr + skipr if residual else yr
    yr = F.leaky_relu(yr, 0.01) if activation == "leaky_relu" else yr
    yr.backward(dy.double())
    hw = x[0, 0].numel()
    checks = [("y", y, yr, TOL[dtype]), ("dx", xs.grad, xr.grad, TOL[dtype]),
              ("dweight", ws.grad, wr.grad, grad_tol(dtype, shape[0] * hw)),
              ("dbias", bs.grad, br.grad, grad_tol(dtype, shape[0] * hw)),
              ("running_mean", rms, rmr, TOL[dtype]), ("running_var", rvs, rvr, TOL[dtype])]
    if residual:
        assert tuple(skips.grad.placements) == tuple(placements)
        checks.append(("dresidual", skips.grad, skipr.grad, TOL[dtype]))
    for name, got, want, tol in checks:
        torch.testing.assert_close(got.full_tensor().double().cpu(), want.detach(), **tol,
                                   msg=lambda m: f"{name} on {tuple(placements)}: {m}")
    return forward.calls, backward.calls


def _planes_bytes(planes, values, itemsize):
    return planes * values * itemsize


# --- world of 2 --------------------------------------------------------------------------------

def _batch_and_channel_rank(rank, world):
    """Shard(0) (uneven: 3 over 2) and Shard(1) (3 channels over 2), with replicated and with
    channel-sharded parameters and running statistics."""
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))
    shape = (3, 3, 4, 3)
    calls = {}
    calls["batch"] = _case(mesh, shape, [Shard(0)])
    calls["channels"] = _case(mesh, shape, [Shard(1)])
    calls["channels, sharded parameters"] = _case(mesh, shape, [Shard(1)],
                                                  param_placements=[Shard(0)])
    calls["replicated"] = _case(mesh, shape, [Replicate()], activation=None)
    calls["batch, residual"] = _case(mesh, shape, [Shard(0)], residual=True)
    return calls


def test_batch_and_channel_shards_compute_locally(world2):
    """No communication, but for the statistics of the planes the running statistics average
    that this rank does not hold: where they are whole and the batch or the channels split, an
    all-gather of NUM_STATS float64 values per plane (padded to the largest shard)."""
    results = world2.run(_batch_and_channel_rank)
    gather_bytes = constants.NUM_STATS * 8 * 2 * 3  # the largest shard: 2 samples or channels
    for calls, launches in results:
        assert launches["_fwd"] >= 5 and launches["_bwd"] >= 5
        assert launches["_update_running_stats"] == 5
        for case, (forward, backward) in calls.items():
            if case in ("batch", "channels", "batch, residual"):
                assert forward == [("all_gather_into_tensor", gather_bytes)], (case, forward)
            else:
                assert forward == [], (case, forward)
            assert backward == [], (case, backward)  # gradients Partial or sharded: no traffic


def _spatial_rank(rank, world):
    """Every spatial dim of a 3-d input (Shard(4): 3 over 2, uneven), float64, fused activation,
    running statistics; and the eval forward."""
    from torch.distributed.tensor import Replicate, Shard, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))
    shape = (2, 3, 5, 4, 3)
    calls = {dim: _case(mesh, shape, [Shard(dim)]) for dim in (2, 3, 4)}
    calls["eval"] = _case(mesh, shape, [Shard(2)], training=False)
    calls["residual"] = _case(mesh, shape, [Shard(3)], residual=True)
    # the combined statistics, replicated: every rank must hold the same bits
    mean, std = tin.instance_stats(_placed(_data(shape, F64, 1, True), mesh, [Shard(4)]))
    assert mean.placements == std.placements == (Replicate(),)
    return calls, torch.stack([mean.to_local(), std.to_local()]).cpu()


def test_spatial_shards_exchange_per_plane_statistics_only(world2):
    results = world2.run(_spatial_rank)
    planes = 2 * 3
    assert torch.equal(results[0][0][1], results[1][0][1])  # the same statistics on each rank
    for (calls, _), launches in results:
        assert launches["_bwd_split_sums"] >= 3 and launches["_fwd"] >= 3 * 2 + 1
        for dim in (2, 3, 4):
            forward, backward = calls[dim]
            # one all-gather each: NUM_STATS float64 per plane and the part's count; the two
            # per-plane sums in the accumulation dtype (float64 here)
            assert forward == [("_allgather_base_", (constants.NUM_STATS * planes + 1) * 8)]
            assert backward == [("_allgather_base_", constants.NUM_SUMS * planes * 8)]
        forward, backward = calls["eval"]
        assert forward == [] and backward == []  # elementwise; gradients Partial
        # a fused residual add is elementwise: the same per-plane exchange, nothing more
        assert calls["residual"] == calls[2]


def _float32_rank(rank, world):
    """float32 with adversarial planes (halves 1e4 apart, mean 1e4 with spread 1e-2, constant),
    split along the dim that splits them, and along the last; eps=0 too."""
    from torch.distributed.tensor import Shard, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))
    shape = (2, 3, 8, 3)
    _case(mesh, shape, [Shard(2)], F32, adversarial=True)
    _case(mesh, shape, [Shard(3)], F32, adversarial=True, eps=0.0)
    # each part's planes split across programs too (tiles of 4, chunks of 4: 3 per part)
    with heuristics.tile_limit(4), heuristics.split_planes(4):
        _case(mesh, shape, [Shard(2)], F32, adversarial=True)


def test_spatial_float32_adversarial_planes(world2):
    for _, launches in world2.run(_float32_rank):
        assert launches["_bwd_split_sums"] == 3
        assert launches["_fwd_combine"] == 1 and launches["_bwd_combine"] == 1


def _layers_rank(rank, world):
    """What users call: our module (parameters and buffers distributed), torch's module under
    enabled(), a converted model with the activation fused, and AdaIN; all on Shard(2)."""
    from torch.distributed.tensor import Shard, distribute_module, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))
    x = _data((2, 3, 4, 3, 2), F64, 7)
    dy = _data((2, 3, 4, 3, 2), F64, 8)

    def check(model, ref, x=x):
        xs = _placed(x, mesh, [Shard(2)], True)
        ys = model(xs)
        ys.backward(_placed(dy, mesh, [Shard(2)]))
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        yr.backward(dy)
        assert tuple(ys.placements) == (Shard(2),)
        torch.testing.assert_close(ys.full_tensor().cpu(), yr, **TOL[F64])
        torch.testing.assert_close(xs.grad.full_tensor().cpu(), xr.grad, **TOL[F64])

    def pair(make):
        torch.manual_seed(0)
        ref = make()
        ours = make()
        ours.load_state_dict(ref.state_dict())
        return ours, ref

    ours, ref = pair(lambda: torch.nn.InstanceNorm3d(3, affine=True, track_running_stats=True,
                                                     dtype=F64))
    ours = distribute_module(tin.convert_instance_norm(ours), mesh)
    check(ours, ref)
    for name in ("weight", "bias", "running_mean", "running_var"):  # updated as torch's
        torch.testing.assert_close(ours.state_dict()[name].full_tensor().cpu(),
                                   ref.state_dict()[name], **TOL[F64], msg=name)

    ours, ref = pair(lambda: torch.nn.InstanceNorm3d(3, affine=True, dtype=F64))
    distribute_module(ours, mesh)
    with tin.enabled():
        check(ours, ref)

    def block():
        return torch.nn.Sequential(torch.nn.InstanceNorm3d(3, affine=True, dtype=F64),
                                   torch.nn.LeakyReLU(0.2))
    ours, ref = pair(block)
    ours = tin.convert_instance_norm(ours, fuse_activation=True)
    assert ours[0].activation == "leaky_relu"
    check(distribute_module(ours, mesh), ref)

    # AdaIN: the content's and the style's planes split; gradients to both
    style = _data((2, 3, 4, 3, 2), F64, 9) * 3 + 1
    styles = _placed(style, mesh, [Shard(2)], True)
    styler = style.clone().requires_grad_()

    def adain_reference(content):
        var, mean = torch.var_mean(styler, (2, 3, 4), correction=0, keepdim=True)
        return F.instance_norm(content) * torch.sqrt(var + 1e-5) + mean
    check(lambda xs: tin.adain(xs, styles), adain_reference)
    torch.testing.assert_close(styles.grad.full_tensor().cpu(), styler.grad, **TOL[F64])


def _readme_example_rank(rank, world):
    """The README's example, small: each rank holds its half of the depth of a 3-d volume."""
    from torch.distributed.tensor import DTensor, Shard, distribute_module, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.InstanceNorm3d(4, affine=True, track_running_stats=True),
            torch.nn.LeakyReLU(0.01), torch.nn.InstanceNorm3d(4, affine=True),
            torch.nn.GELU()).to(DEVICE, F64)
    model = distribute_module(tin.convert_instance_norm(make(), fuse_activation=True), mesh)
    volume = _data((2, 4, 6, 3, 2), F64, 11).to(DEVICE)
    x = DTensor.from_local(volume.chunk(world, dim=2)[rank], mesh, [Shard(2)])
    y = model(x)
    assert y.placements == (Shard(2),) and y.to_local().shape[2] == 3
    y.square().mean().backward()

    ref = make()
    ref(volume).square().mean().backward()
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got.grad.full_tensor(), want.grad, **TOL[F64], msg=name)
    torch.testing.assert_close(model[0].running_var.full_tensor(), ref[0].running_var,
                               **TOL[F64])


def test_readme_example(world2):
    for _, launches in world2.run(_readme_example_rank):
        assert launches["_fwd"] == 2 * 2 and launches["_bwd"] == 2


def test_layers_and_adain_on_spatial_shards(world2):
    for _, launches in world2.run(_layers_rank):
        assert launches["_fwd"] >= 5 and launches["_stats_bwd"] == 1
        assert launches["_bwd_split_sums"] == 4


# --- uneven splits: a world of 3 ---------------------------------------------------------------

def _uneven_rank(rank, world):
    """Splits of 5 (2, 2, 1) and of 2 over 3 (1, 1, 0): a rank with no element of the planes,
    no sample, no channel."""
    from torch.distributed.tensor import Shard, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))
    shape = (2, 2, 5, 2)
    for dim in range(4):
        _case(mesh, shape, [Shard(dim)])
    _case(mesh, shape, [Shard(1)], param_placements=[Shard(0)])


def test_uneven_splits_world_of_3(world3):
    for rank, (_, launches) in enumerate(world3.run(_uneven_rank)):
        assert launches["_bwd_split_sums"] == (2 if rank < 2 else 1)  # rank 2: no element
        assert launches["_fwd"] >= (7 if rank < 2 else 2)  # rank 2: a part of dim 2 alone


# --- the bytes a spatially split call exchanges, against torch's own path -------------------------

TRAFFIC_SHAPE = (2, 16, 8, 8, 8)  # float32, Shard(2) over 2 ranks


def _traffic_rank(rank, world):
    from torch.distributed.tensor import Shard, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))
    x = _data(TRAFFIC_SHAPE, F32, 1)
    out = {}
    for name, norm in (("ours", tin.instance_norm), ("torch", F.instance_norm)):
        xs = _placed(x, mesh, [Shard(2)], True)
        dys = _placed(_data(TRAFFIC_SHAPE, F32, 2), mesh, [Shard(2)])
        with Collectives() as forward:
            y = norm(xs)
        with Collectives() as backward:
            y.backward(dys)
        out[name] = [sum(b for _, b in calls.calls) for calls in (forward, backward)]
    return out


def test_spatial_traffic_is_per_plane_not_the_tensor(world2):
    """The README's numbers: bytes each rank sends per call."""
    planes = TRAFFIC_SHAPE[0] * TRAFFIC_SHAPE[1]
    tensor_bytes = torch.Size(TRAFFIC_SHAPE).numel() * 4
    for out, _ in world2.run(_traffic_rank):
        assert out["ours"] == [(constants.NUM_STATS * planes + 1) * 8,
                               constants.NUM_SUMS * planes * 4], out
        assert min(out["torch"]) >= tensor_bytes // 2, out  # torch gathers the tensor


def _errors_rank(rank, world):
    """What is not supported raises, on every rank, before any collective: no hang."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, init_device_mesh

    mesh = init_device_mesh(DEVICE, (world,))
    x = _data((2, 3, 4, 3), F64, 1).to(DEVICE)
    partial = DTensor.from_local(x, mesh, [Partial()])
    with pytest.raises(NotImplementedError, match="Partial placement"):
        tin.instance_norm(partial)
    xs = _placed(x, mesh, [Shard(2)])
    with pytest.raises(RuntimeError, match="mixed torch.Tensor and DTensor"):
        tin.instance_norm(xs, weight=torch.ones(3, dtype=F64, device=DEVICE))
    rm = _placed(torch.zeros(3, dtype=F64), mesh, [Replicate()])
    rv = _placed(torch.ones(3, dtype=F64), mesh, [Shard(0)])
    with pytest.raises(NotImplementedError, match="running statistics"):
        tin.instance_norm(xs, rm, rv)
    # the group still works: nothing is left waiting
    return tin.instance_norm(xs).full_tensor().sum().item()


def test_unsupported_placements_raise(world2):
    sums = [value for value, _ in world2.run(_errors_rank)]
    assert sums[0] == sums[1]


# --- a 2-d mesh: a world of 4 ------------------------------------------------------------------

def _mesh_2d_rank(rank, world):
    """Splits along two mesh dims at once: batch and space, channels and space, two spatial
    dims, one spatial dim split twice."""
    from torch.distributed.tensor import Shard, init_device_mesh

    mesh = init_device_mesh(DEVICE, (2, 2))
    shape = (2, 3, 5, 4, 2)
    for placements in ([Shard(0), Shard(2)], [Shard(1), Shard(3)], [Shard(2), Shard(3)],
                       [Shard(2), Shard(2)], [Shard(4), Shard(1)]):
        _case(mesh, shape, placements)
    _case(mesh, shape, [Shard(2), Shard(1)], param_placements=[Shard(0), Shard(0)])


@pytest.mark.slow
def test_two_dim_mesh_world_of_4():
    world = World(4)
    try:
        for _, launches in world.run(_mesh_2d_rank, timeout=600):
            assert launches["_bwd_split_sums"] == 6
    finally:
        world.stop()
