"""The GPU a launch is planned for: what the heuristics need to know about it, and whether the
installed Triton can launch thread-block clusters on it.

``describe(where)`` returns a ``Device``: the CUDA (or ROCm) device ``where`` (a torch.device),
read once per device from ``torch.cuda.get_device_properties``; for any other device (the
interpreter on the CPU) an *emulated* GPU, H100 unless ``TRITON_INSTNORM_EMULATE`` names another
one of ``EMULATED``, so that the CPU takes the launch decisions that GPU would take.

Clusters (``cluster_launch``): on NVIDIA sm_90 and newer a kernel launched with ``num_ctas=N``
runs each program as a cluster of N thread blocks (CTAs), and Triton lowers a ``tl.sum`` over a
tile spread across them to a reduction through distributed shared memory. Triton 3.8 is the first
release whose compiler lowers it (3.6 and 3.7 fail in the PlanCTA pass); on a real device a
one-time compile probe confirms it for that architecture. How Triton maps the grid (from
triton 3.9's sources): the grid stays in programs; the launcher starts ``grid[0] * num_ctas``
CTAs along x with a cluster dimension of ``(num_ctas, 1, 1)`` (``backends/nvidia/driver.c``,
``_launch``), and the kernel's ``tl.program_id(0)`` / ``tl.num_programs(0)`` are the CTA index
and count divided by ``num_ctas``. ``num_ctas`` is a launch option like ``num_warps``, part of the
kernel cache key. Cluster launches stay off unless ``TRITON_INSTNORM_CLUSTERS=1``, which is read at
every launch decision.
"""

import functools
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .kernels.common import INTERPRETED

EMULATE_ENV = "TRITON_INSTNORM_EMULATE"
CLUSTERS_ENV = "TRITON_INSTNORM_CLUSTERS"
FIRST_CLUSTER_TRITON = (3, 8)  # the first Triton whose compiler lowers cross-CTA reductions
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Device:
    """What the launch configuration depends on; ``capability`` as torch reports it (an
    MI300X reports (9, 4): Hopper-like numbers that mean nothing for clusters)."""

    name: str
    vendor: str  # "nvidia" or "amd"
    arch: str  # "sm_90", "gfx942": the compiler target
    capability: tuple
    sms: int  # streaming multiprocessors (compute units on AMD)
    warp_size: int  # lanes per warp (wavefront)
    l2_bytes: int
    shared_bytes: int  # shared memory one CTA may use (opt-in maximum)

    @property
    def clusters(self) -> bool:
        """The hardware launches thread-block clusters (NVIDIA sm_90 and newer)."""
        return self.vendor == "nvidia" and self.capability >= (9, 0)


# Figures as torch.cuda.get_device_properties reports them on each GPU (L2: the MI300X reports
# one XCD's 4 MiB).
MIB, KIB = 1 << 20, 1 << 10
EMULATED = {
    "h100": Device("NVIDIA H100 80GB HBM3", "nvidia", "sm_90", (9, 0), 132, 32, 50 * MIB,
                   227 * KIB),
    "h200": Device("NVIDIA H200", "nvidia", "sm_90", (9, 0), 132, 32, 60 * MIB, 227 * KIB),
    "a100": Device("NVIDIA A100-SXM4-80GB", "nvidia", "sm_80", (8, 0), 108, 32, 40 * MIB,
                   163 * KIB),
    "b200": Device("NVIDIA B200", "nvidia", "sm_100", (10, 0), 148, 32, 126 * MIB, 227 * KIB),
    "mi300x": Device("AMD Instinct MI300X", "amd", "gfx942", (9, 4), 304, 64, 4 * MIB, 64 * KIB),
}
DEFAULT_EMULATED = "h100"


def emulated() -> Device:
    """The GPU modelled without a CUDA device: ``TRITON_INSTNORM_EMULATE`` (read at each call),
    H100 when unset."""
    name = os.environ.get(EMULATE_ENV, "").strip().lower() or DEFAULT_EMULATED
    if name not in EMULATED:
        raise ValueError(f"{EMULATE_ENV}={name!r}: expected one of {', '.join(EMULATED)}")
    return EMULATED[name]


def describe(where: torch.device) -> Device:
    """The CUDA device ``where``, or the emulated one when it is not a CUDA device."""
    if where.type != "cuda":
        return emulated()
    return _cuda_device(where.index if where.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    hip = torch.version.hip is not None
    capability = (props.major, props.minor)
    arch = (props.gcnArchName.split(":")[0] if hip
            else f"sm_{capability[0]}{capability[1]}")
    return Device(props.name, "amd" if hip else "nvidia", arch, capability,
                  props.multi_processor_count, getattr(props, "warp_size", 64 if hip else 32),
                  getattr(props, "L2_cache_size", 0),
                  getattr(props, "shared_memory_per_block_optin", 48 * KIB))


# ------------------------------------------------------------------------------------ clusters

def clusters_requested() -> bool:
    """``TRITON_INSTNORM_CLUSTERS`` is set to 1 (read at every launch decision)."""
    return os.environ.get(CLUSTERS_ENV, "0").strip().lower() in _TRUE


def triton_version(version: str | None = None) -> tuple:
    """(major, minor) of a Triton version string such as ``3.9.0`` or ``3.8.0+git1234``; the
    installed Triton's by default."""
    parts = (version or triton.__version__).split("+")[0].split(".")
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts[:2])


def cluster_launch(dev: Device, real: bool) -> bool:
    """Plans may launch clusters on ``dev``: asked for, and ``clusters_supported``."""
    return clusters_requested() and clusters_supported(dev, real)


def clusters_supported(dev: Device, real: bool) -> bool:
    """The hardware has clusters and the installed Triton lowers cluster reductions (for a
    ``real`` device, not the interpreter: confirmed by a compile probe)."""
    if not dev.clusters or triton_version() < FIRST_CLUSTER_TRITON:
        return False
    return not real or INTERPRETED or _probe(dev.capability)


@triton.jit
def _cluster_sum(X, BLOCK: tl.constexpr):
    """The construct the cluster tiles rely on: a sum over a tile spread across the CTAs."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(X + offs, x - tl.sum(x, axis=0))


@functools.lru_cache(maxsize=None)
def _probe(capability: tuple) -> bool:
    """Compiles a 2-CTA cluster reduction for this architecture once; False (with a warning,
    the clusters were asked for) if the compiler does not produce a cluster kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    source = ASTSource(fn=_cluster_sum, signature={"X": "*fp32", "BLOCK": "constexpr"},
                       constexprs={(1,): 2048})
    try:
        ptx = triton.compile(source, target=target, options={"num_warps": 4, "num_ctas": 2})
        ok = ".reqnctapercluster 2" in ptx.asm.get("ptx", "")
        why = "the kernel it compiled is not a 2-CTA cluster"
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: no clusters
        ok, why = False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if not ok:
        warnings.warn(f"{CLUSTERS_ENV}=1 but Triton {triton.__version__} cannot compile a "
                      f"cluster reduction for sm_{target.arch} ({why}): planes are not held in "
                      "clusters", RuntimeWarning, stacklevel=3)
    return ok
