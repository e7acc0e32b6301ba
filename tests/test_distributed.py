"""Many processes: DistributedDataParallel and FSDP2 (``fully_shard``) with converted, fused
models give the parameters of one process training on the whole batch.

The worlds are real process groups: ``run_world`` spawns the ranks, joins them in a gloo group on
127.0.0.1 (NCCL, one GPU per rank, where CUDA is there) and bounds them in time, so that a hang
fails the test instead of blocking it. Each rank runs the kernels (through Triton's interpreter
on the CPU) and reports its launch counts: a fallback to eager torch would show as none.
DTensor (sharded tensors) is in test_distributed_dtensor.py.
"""

import io
import os
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
from utils import DEVICE  # sets TRITON_INTERPRET=1 without CUDA, before triton is imported

from triton_instnorm import launch
from triton_instnorm.convert import convert_instance_norm

F64 = torch.float64
nn = torch.nn
TASK_TIMEOUT = 120  # s for one task on every rank (also the collectives' timeout)
STARTUP = 60  # s more for the first task of a world: spawn, imports, the group


# --- running a world ------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, size, port, tasks, results):
    """One rank: joins the group, then runs each task ``(fn, args)`` from its queue as
    ``fn(rank, size, *args)`` and sends back what it returned (or its traceback) with the kernel
    launches it made; None ends it."""
    import torch.distributed as dist

    if os.environ.get("TRITON_INTERPRET") == "1":
        from conftest import _patch_each_language_once_per_launch  # as the test process has it
        _patch_each_language_once_per_launch()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "gloo"
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, rank=rank, world_size=size,
                            timeout=timedelta(seconds=TASK_TIMEOUT))
    try:
        while (task := tasks.get()) is not None:
            fn, args = task
            start = dict(launch.LAUNCHES)
            try:
                result = {"value": fn(rank, size, *args)}
            except BaseException:
                result = {"error": traceback.format_exc()}
            result["launches"] = {k: v - start.get(k, 0) for k, v in launch.LAUNCHES.items()}
            buffer = io.BytesIO()
            torch.save(result, buffer)
            results.put((rank, buffer.getvalue()))
        # Tear down together: a rank that destroys its group while another still talks to the
        # store (hosted by rank 0) can abort inside gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    results.put((rank, None))  # done: the rest is the interpreter's exit, not worth waiting for


class World:
    """``size`` spawned ranks in one process group, kept for the tasks of a test module (starting
    a world takes seconds: imports, the group). ``run`` bounds each task in time; a failed or
    hung task stops the world, and the next task starts a fresh one."""

    def __init__(self, size: int):
        self.size = size
        self.processes = []

    def _start(self):
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if not dist.is_available() or not dist.is_gloo_available():
            pytest.skip("torch.distributed with the gloo backend is unavailable")
        if DEVICE == "cuda" and torch.cuda.device_count() < self.size:
            pytest.skip(f"{self.size} ranks need {self.size} GPUs")
        ctx = mp.get_context("spawn")  # children start clean: TRITON_INTERPRET before triton
        self.tasks = [ctx.SimpleQueue() for _ in range(self.size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.processes = [ctx.Process(target=_rank_main, daemon=True,
                                      args=(rank, self.size, port, self.tasks[rank],
                                            self.results))
                          for rank in range(self.size)]
        for p in self.processes:
            p.start()

    def run(self, fn, *args, timeout=TASK_TIMEOUT):
        """``fn(rank, size, *args)`` on every rank: [(what it returned, its kernel launches)] in
        rank order. A rank that raised fails the test with its traceback."""
        starting = not self.processes
        if starting:
            self._start()
        for tasks in self.tasks:
            tasks.put((fn, args))
        results, errors = {}, []
        deadline = time.monotonic() + timeout + (STARTUP if starting else 0)
        while len(results) < self.size:
            try:
                rank, data = self.results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue_module.Empty:
                self.stop(wait=0)
                pytest.fail(f"{fn.__name__}: ranks {sorted(set(range(self.size)) - set(results))} "
                            f"did not finish within {timeout} s")
            results[rank] = torch.load(io.BytesIO(data), weights_only=False)
            if "error" in results[rank]:
                errors.append(f"rank {rank} of {fn.__name__} raised:\n{results[rank]['error']}")
                break
        if errors:
            self.stop(wait=0)
            pytest.fail("\n".join(errors))
        return [(results[r]["value"], results[r]["launches"]) for r in range(self.size)]

    def stop(self, wait=30):
        """Ends the ranks: the way out of their loop, and once they are done (or after ``wait``
        s; none after a failure: the others may wait in a collective for the rank that failed),
        terminated."""
        if not self.processes:
            return
        for tasks in self.tasks:
            tasks.put(None)
        deadline = time.monotonic() + wait
        done = 0
        while done < self.size and time.monotonic() < deadline:
            try:
                done += self.results.get(timeout=max(deadline - time.monotonic(), 0.1))[1] is None
            except queue_module.Empty:
                break
        for p in self.processes:  # the children we started, done or failed
            if p.is_alive():
                p.terminate()
                p.join(10)
        self.processes = []


@pytest.fixture(scope="module")
def world2():
    world = World(2)
    yield world
    world.stop()


# --- data parallel: DDP, FSDP2 --------------------------------------------------------------------

STEPS = 2


def _net(dims):
    """A small nnU-Net-style stack: conv, instance norm, LeakyReLU (fused by the conversion)."""
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    torch.manual_seed(dims)  # the same initial weights on every rank
    return nn.Sequential(
        conv(2, 3, 3, padding=1), norm(3, affine=True, track_running_stats=True),
        nn.LeakyReLU(0.01), conv(3, 2, 1), norm(2, affine=True), nn.ReLU(),
    ).to(DEVICE, F64)


def _batch(dims, rank, step, n=2):
    g = torch.Generator().manual_seed(100 * dims + 10 * rank + step)  # different data per rank
    return torch.randn((n, 2) + (5, 4, 3)[:dims], generator=g, dtype=F64).to(DEVICE)


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _reference(dims, world):
    """torch's own layers, one process, each step on the ranks' batches together."""
    ref = _net(dims)
    _train(ref, [torch.cat([_batch(dims, r, s) for r in range(world)]) for s in range(STEPS)])
    return ref


def _fused(dims):
    model = convert_instance_norm(_net(dims), fuse_activation=True)
    fused = [m.activation for m in model.modules() if hasattr(m, "activation")]
    assert fused == ["leaky_relu", "relu"], fused
    return model


def _ddp_rank(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for dims in (2, 3):
        model = _fused(dims)
        _train(DDP(model), [_batch(dims, rank, s) for s in range(STEPS)])
        out[dims] = {k: v.detach().cpu() for k, v in model.named_parameters()}
    return out


def test_ddp_converted_fused_2d_3d_match_one_process(world2):
    results = world2.run(_ddp_rank)
    for dims in (2, 3):
        want = dict(_reference(dims, 2).named_parameters())
        for params, launches in results:
            assert launches.get("_fwd", 0) >= 2 * 2 * STEPS and launches.get("_bwd", 0) > 0
            assert params[dims].keys() == want.keys()
            for k, v in params[dims].items():
                torch.testing.assert_close(v, want[k].detach().cpu(), rtol=1e-10, atol=1e-12,
                                           msg=f"{dims}-d {k}")


def _fsdp_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(DEVICE, (world,))
    model = _fused(3)
    for layer in model:
        if any(p.requires_grad for p in layer.parameters(recurse=False)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _train(model, [_batch(3, rank, s) for s in range(STEPS)])
    return {k: v.full_tensor().detach().cpu() for k, v in model.named_parameters()}


def test_fsdp2_converted_fused_matches_one_process(world2):
    results = world2.run(_fsdp_rank)
    want = dict(_reference(3, 2).named_parameters())
    for params, launches in results:
        assert launches.get("_fwd", 0) >= 2 * STEPS and launches.get("_bwd", 0) > 0
        assert params.keys() == want.keys()
        for k, v in params.items():
            torch.testing.assert_close(v, want[k].detach().cpu(), rtol=1e-10, atol=1e-12, msg=k)
