"""convert_instance_norm / revert_instance_norm: what carries over, training equivalence, DDP."""

import os
import socket
import time
import warnings
from datetime import timedelta

import pytest
import torch
from utils import DEVICE  # sets TRITON_INTERPRET=1 without CUDA, before triton is imported

import triton_instnorm as tin
from triton_instnorm import launch
from triton_instnorm.convert import convert_instance_norm, revert_instance_norm

F64 = torch.float64
nn = torch.nn
CLASSES = [("InstanceNorm1d", (2, 4, 6)), ("InstanceNorm2d", (2, 4, 3, 4)),
           ("InstanceNorm3d", (2, 4, 2, 3, 2))]
CONFIGS = [dict(), dict(affine=True, track_running_stats=True, momentum=None, eps=1e-3),
           dict(affine=True, bias=False, momentum=0.3), dict(track_running_stats=True)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name,shape", CLASSES)
@pytest.mark.parametrize("training", [True, False])
def test_layer_round_trip_keeps_arguments_and_tensors(name, shape, cfg, training, launches):
    old = getattr(nn, name)(4, device=DEVICE, dtype=F64, **cfg).train(training)
    tensors = dict(old.named_parameters()) | dict(old.named_buffers())
    new = convert_instance_norm(old)
    assert type(new) is getattr(tin, name) and new.activation is None
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(new, attr) == getattr(old, attr), attr
    assert (new.bias is None) == (old.bias is None)
    # The very same objects: optimizer state and outside references stay valid.
    assert all(getattr(new, k) is t for k, t in tensors.items())
    assert list(new.state_dict()) == list(old.state_dict())
    x = torch.randn(shape, device=DEVICE, dtype=F64)
    torch.testing.assert_close(new(x), old(x), rtol=1e-12, atol=1e-12)
    assert launches("_fwd") == 1
    back = revert_instance_norm(new)
    assert type(back) is getattr(nn, name) and back.training == training
    assert all(getattr(back, k) is t for k, t in tensors.items())


def test_containers_in_place_shared_modules_and_idempotence():
    shared = nn.InstanceNorm2d(4)
    inner = nn.Sequential(nn.Conv2d(4, 4, 1), shared)
    model = nn.ModuleDict({"a": inner, "b": nn.ModuleList([shared, nn.InstanceNorm3d(2)])})
    assert convert_instance_norm(model) is model and model["a"] is inner
    assert type(model["a"][1]) is tin.InstanceNorm2d and type(model["b"][1]) is tin.InstanceNorm3d
    assert model["a"][1] is model["b"][0]  # still one module, shared at both places
    before = list(model.modules())
    assert convert_instance_norm(model) is model
    assert all(a is b for a, b in zip(model.modules(), before, strict=True))  # nothing rebuilt


def test_lazy_and_subclasses_are_left_alone():
    class Custom(nn.InstanceNorm2d):  # may override forward: not ours to replace
        pass

    lazy, custom = nn.LazyInstanceNorm2d(affine=True), Custom(3)
    model = convert_instance_norm(nn.Sequential(lazy, custom))
    assert model[0] is lazy and model[1] is custom
    model(torch.randn(2, 3, 4, 4))  # initializes the lazy layer: it becomes nn.InstanceNorm2d
    convert_instance_norm(model)
    assert type(model[0]) is tin.InstanceNorm2d and model[0].num_features == 3
    assert model[1] is custom


def test_hooks_follow_the_layer(launches):
    layer = nn.InstanceNorm1d(4, affine=True, device=DEVICE, dtype=F64)
    calls = []
    handles = [
        layer.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m)))),
        layer.register_forward_hook(lambda m, args, out: calls.append(("fwd", type(m)))),
        layer.register_forward_hook(lambda m, a, kw, out: calls.append(("kw", type(m))),
                                    with_kwargs=True),
        layer.register_full_backward_hook(lambda m, gi, go: calls.append(("bwd", type(m)))),
    ]
    new = convert_instance_norm(layer)
    x = torch.randn(2, 4, 5, device=DEVICE, dtype=F64, requires_grad=True)
    new(x).sum().backward()
    ours = tin.InstanceNorm1d
    assert calls == [("pre", ours), ("fwd", ours), ("kw", ours), ("bwd", ours)]
    assert launches("_fwd") == 1
    for h in handles:  # the handles taken on the old layer still work
        h.remove()
    calls.clear()
    new(x).sum().backward()
    assert calls == []


def test_what_the_user_set_follows_the_layer_and_comes_back(launches):
    """Attributes, an instance-level forward (as accelerate's wrappers set), state-dict hooks
    (those that hold a weak reference to the layer included)."""
    layer = nn.InstanceNorm2d(3, affine=True, device=DEVICE, dtype=F64)
    layer.frozen = True
    seen = []
    handles = [
        layer.register_state_dict_pre_hook(lambda m, *a: seen.append(("pre", type(m)))),
        layer.register_state_dict_post_hook(lambda m, *a: seen.append(("post", type(m)))),
        layer.register_load_state_dict_pre_hook(lambda m, *a: seen.append(("load", type(m)))),
        layer.register_load_state_dict_post_hook(lambda m, *a: seen.append(("loaded", type(m)))),
    ]
    new = convert_instance_norm(layer)
    assert type(new) is tin.InstanceNorm2d and new.frozen is True
    new.load_state_dict(new.state_dict())
    assert seen == [(k, tin.InstanceNorm2d) for k in ("pre", "post", "load", "loaded")]
    back = revert_instance_norm(new)
    assert type(back) is nn.InstanceNorm2d and back.frozen is True
    assert not {"activation", "negative_slope"} & set(vars(back))
    seen.clear()
    back.load_state_dict(back.state_dict())
    assert seen == [(k, nn.InstanceNorm2d) for k in ("pre", "post", "load", "loaded")]
    for h in handles:  # the handles taken on the first layer still work
        h.remove()
    seen.clear()
    back.load_state_dict(back.state_dict())
    assert seen == []

    calls = []
    plain = layer.forward
    layer.forward = lambda x: calls.append(x) or plain(x)  # an instance-level override
    new = convert_instance_norm(layer)
    assert new.forward is layer.forward
    new(torch.randn(2, 3, 4, 4, device=DEVICE, dtype=F64))
    assert len(calls) == 1 and revert_instance_norm(new).forward is layer.forward


def test_script_modules_are_left_whole():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3)))
    model = convert_instance_norm(nn.Sequential(scripted, nn.InstanceNorm2d(3)))
    assert model[0] is scripted and type(model[1]) is tin.InstanceNorm2d


def test_revert_refuses_a_fused_activation_and_changes_nothing():
    model = nn.Sequential(nn.InstanceNorm2d(4),
                          nn.Sequential(tin.InstanceNorm2d(4, activation="leaky_relu")))
    convert_instance_norm(model)
    with pytest.raises(ValueError, match=r"'1\.0'.*activation='leaky_relu'.*no fused activation"):
        revert_instance_norm(model)
    assert type(model[0]) is tin.InstanceNorm2d  # checked before anything was swapped
    with pytest.raises(ValueError, match="the module passed"):
        revert_instance_norm(tin.InstanceNorm1d(4, activation="relu"))
    model[1][0].activation = None
    revert_instance_norm(model)
    assert type(model[0]) is type(model[1][0]) is nn.InstanceNorm2d


def _net_2d():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                         nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                         nn.LeakyReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.InstanceNorm2d(4), nn.Conv2d(4, 2, 1))


def _net_1d():
    return nn.Sequential(nn.Conv1d(3, 4, 3, padding=1),
                         nn.InstanceNorm1d(4, affine=True, bias=False, track_running_stats=True,
                                           momentum=None),
                         nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1),
                         nn.InstanceNorm1d(4, affine=True, track_running_stats=True, momentum=0.3))


def _net_3d():
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1),
                         nn.InstanceNorm3d(4, affine=True, track_running_stats=True, eps=1e-3),
                         nn.SiLU(), nn.Conv3d(4, 2, 1))


def _train(model, batches, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("make,shape", [(_net_2d, (2, 3, 8, 8)), (_net_1d, (2, 3, 10)),
                                        (_net_3d, (2, 2, 4, 4, 3))])
def test_converted_training_matches_torch(make, shape, launches):
    torch.manual_seed(0)
    ref = make().to(DEVICE, F64)
    ours = make().to(DEVICE, F64)
    ours.load_state_dict(ref.state_dict())
    # The optimizer is built BEFORE the conversion: it only works if the Parameters are reused.
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    convert_instance_norm(ours)
    batches = [torch.randn(shape, device=DEVICE, dtype=F64) for _ in range(3)]
    _train(ref, batches)
    _train(ours, batches, opt)
    assert launches("_fwd") == 3 * sum(isinstance(m, nn.InstanceNorm1d | nn.InstanceNorm2d |
                                                  nn.InstanceNorm3d) for m in ours.modules())
    got, want = revert_instance_norm(ours).state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


# --- DistributedDataParallel: two processes, gloo ------------------------------------------------

WORLD, STEPS = 2, 3


def _ddp_net():
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    return _net_2d()[:5].to(DEVICE, F64)


def _ddp_batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)  # different data on each rank
    return torch.randn((2, 3, 6, 6), generator=g, dtype=F64).to(DEVICE)


def _ddp_worker(rank, port, out_dir):
    """One DDP rank. By the time this runs, importing this file (in the fresh 'spawn' child) has
    set TRITON_INTERPRET through utils before triton was imported; check rather than trust."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert tin.kernels_available(torch.empty(0, device=DEVICE)), "child would run eager torch"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model = convert_instance_norm(_ddp_net())
        ddp = DDP(model)
        _train(ddp, [_ddp_batch(rank, s) for s in range(STEPS)])
        # DDP broadcasts rank 0's buffers at the start of each forward, but each rank then updates
        # its running stats with its own data: one eval forward (which updates nothing) re-syncs.
        with torch.no_grad():
            ddp.eval()(_ddp_batch(rank, 0))
        flat = torch.cat([t.detach().reshape(-1).to("cpu", F64)
                          for t in model.state_dict().values()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save({"launches": launch.LAUNCHES["_fwd"], "gathered": gathered,
                    "params": [p.detach().cpu() for p in model.parameters()]}, path + ".tmp")
        os.replace(path + ".tmp", path)  # complete results or none
        # Tear down together: a rank that destroys its group while the other still talks to the
        # store (hosted by rank 0) can abort inside gloo ("terminate called ...").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    ctx = mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")  # spawn: children start clean
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail("DDP workers did not finish within 120 s")
    except mp.ProcessExitedException:
        # gloo's teardown can abort a rank ("terminate called without an active exception")
        # after all the work is done; only that is tolerated: the results must all be there.
        if not all((tmp_path / f"rank{r}.pt").exists() for r in range(WORLD)):
            raise
        warnings.warn("a DDP rank aborted in process-group teardown after writing its results")
    finally:
        for p in ctx.processes:  # only on failure: stop the children we started
            if p.is_alive():
                p.terminate()
                p.join(10)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in results:
        assert res["launches"] > 0  # our kernels ran in every child
        assert all(torch.equal(g, res["gathered"][0]) for g in res["gathered"])  # bitwise replicas
    # Gradients averaged over the ranks == one process on the whole batch (torch's own layers).
    ref = _ddp_net()
    _train(ref, [torch.cat([_ddp_batch(r, s) for r in range(WORLD)]) for s in range(STEPS)])
    for got, want in zip(results[0]["params"], ref.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach().cpu(), rtol=1e-10, atol=1e-12)
