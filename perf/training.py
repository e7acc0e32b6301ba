"""Training steps for ``perf.models``: the step, its timing, and the check of the two variants.

Imports torch, triton and triton_instnorm (through perf.networks): perf.models imports it only
after deciding whether ``TRITON_INTERPRET`` must be set.

The check runs before any timed step: one float32 step of each variant, TF32 off, from the same
weights and batch; the triton_instnorm variant must give PyTorch's loss and gradients within
``TOLERANCES``. Networks timed under bfloat16 autocast are checked in float32 too: under bf16
autocast two correct implementations differ as much as autocast differs from float32 (on the
smoke U-Net, 10-100% per-tensor gradient differences for *both* variants against float32), so a
bf16 comparison could not tell a wrong kernel from rounding.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time

import torch

from perf import networks
from triton_instnorm.launch import LAUNCHES

# (loss, gradient) relative error allowed between the variants' float32 check steps: only the
# order of the reductions in the instance norms differs.
TOLERANCES = (1e-4, 1e-3)


def make_task(builder: str, kwargs: dict, variant: str, device, memory_format: str):
    torch.manual_seed(0)  # the same weights in both variants
    task = getattr(networks, builder)(**kwargs)
    if variant == "triton_instnorm":
        networks.to_triton(task)
    task = task.to(device)
    if memory_format == "channels_last_3d":
        task = task.to(memory_format=torch.channels_last_3d)
    return task


def make_batch(shape, inputs: str, device, memory_format: str):
    """(image, target) or (content, style) pairs, or (volume, labels) for segmentation."""
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(shape, generator=generator)
    if inputs == "segmentation":
        second = torch.randint(0, 3, (shape[0], *shape[2:]), generator=generator)
    else:
        second = torch.rand(shape, generator=generator) * 2 - 1
    if memory_format == "channels_last_3d":
        first = first.contiguous(memory_format=torch.channels_last_3d)
    return first.to(device), second.to(device)


class Trainer:
    """One variant: the task (compiled or not), Adam, and the step."""

    def __init__(self, task, mode: str, autocast: bool, device):
        if mode == "compile":
            torch._dynamo.reset()  # a fresh compile per variant: no recompile limit, no reuse
        self.run_task = torch.compile(task) if mode == "compile" else task
        self.named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam([p for _, p in self.named], lr=1e-4)
        self.device_type, self.autocast = device.type, autocast

    def loss_and_grads(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.run_task(*batch)
        loss.backward()
        return loss

    def step(self, batch):
        loss = self.loss_and_grads(batch)
        self.optimizer.step()
        return loss

    def counted_step(self, batch):
        """A step; (its loss, the triton_instnorm kernel launches it made)."""
        before = sum(LAUNCHES.values())
        loss = self.step(batch).item()
        return loss, sum(LAUNCHES.values()) - before

    def grads(self):
        return {n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().float().cpu()
                for n, p in self.named}


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(trainer: Trainer, batch, device, warmup: int, steps: int):
    """(median ms per step, peak MiB allocated during the timed steps; NaN on the CPU)."""
    for _ in range(warmup):
        trainer.step(batch)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            trainer.step(batch)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            trainer.step(batch)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else float("nan")
    return statistics.median(times), peak


# --------------------------------------------------------------------------- the check

@contextlib.contextmanager
def full_precision():
    """float32 convolutions and matmuls without TF32 (CUDA's convolution default) for the check."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_step(task, batch, device):
    """One eager float32 step: (loss, {parameter name: gradient on the CPU})."""
    trainer = Trainer(task, "eager", autocast=False, device=device)
    with full_precision():
        loss = trainer.loss_and_grads(batch).item()
    return loss, trainer.grads()


def grad_error(got: dict, want: dict) -> float:
    """Largest per-tensor ||got - want|| / ||want|| over the tensors that carry gradient.

    Tensors whose reference gradient is under 1e-3 of the largest are left out: a conv bias
    right before an instance norm has a zero gradient in exact arithmetic, and its rounding
    noise differs between any two implementations.
    """
    norms = {n: want[n].norm().item() for n in want}
    largest = max(norms.values(), default=0.0)
    errors = [(got[n] - want[n]).norm().item() / norms[n] for n in want if norms[n] > 1e-3 * largest]
    return max(errors, default=0.0)


def compare(reference, candidate) -> dict:
    """The CSV's check columns for two check steps (loss, grads)."""
    (ref_loss, ref_grads), (loss, grads) = reference, candidate
    loss_err = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    grad_err = grad_error(grads, ref_grads)
    loss_tol, grad_tol = TOLERANCES
    problems = [f"loss rel. error {loss_err:.2e} > {loss_tol:g}"] if not loss_err <= loss_tol else []
    problems += [f"grad rel. error {grad_err:.2e} > {grad_tol:g}"] if not grad_err <= grad_tol else []
    return {"loss_rel_err": f"{loss_err:.3g}", "grad_rel_err": f"{grad_err:.3g}",
            "check": "FAIL: " + "; ".join(problems) if problems else "ok"}
