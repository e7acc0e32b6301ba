"""Ahead-of-time compilation of the kernels for a GPU target, on a machine without a GPU: what to
compile, and the worker processes that compile it.

Triton's interpreter, which runs the kernels on the CPU, never invokes the real compiler. Here
they are compiled for real with ``triton.compile(ASTSource(...), target=GPUTarget(...))``: a
*variant* (a plain, JSON-able dict built by ``fwd`` / ``bwd`` / ``stats_bwd`` / ``update``) names
one call of the host code in ``launch.py`` (shape, dtypes, layout, activation, the GPU it is
planned for: ``device``, a name of ``device.EMULATED``, H100 by default; ``clusters``: cluster
launches on), and every kernel launch that call makes is compiled for that GPU's architecture
(``sm_90``, ``sm_100``, ``sm_80``: PTX, ptxas and, for the SASS audit, ``nvdisasm``; ``gfx942``:
AMDGCN). How a launch is captured, specialized and compiled: ``perf/aot_worker.py``.

Compilation must run with TRITON_INTERPRET unset (under the interpreter ``@triton.jit`` returns
``InterpretedFunction`` objects the compiler cannot use), so ``run_worker`` runs
``python -m perf.aot_worker SPEC.json RESULT.json`` in subprocesses; this module imports neither
torch nor triton, and works under the interpreter (the tests call it from pytest).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEVICE = "h100"


# ------------------------------------------------------------------------------------ variants

def fwd(dtype, shape=(2, 8, 32, 32), *, w="same", b="same", running=None, use_input_stats=True,
        activation=0, store_stats=True, write_y=True, layout="contiguous", per_sample=False,
        tile_limit=None, device=DEFAULT_DEVICE, clusters=False, eps=1e-5, residual=False):
    """``launch.forward``. w / b: "same" (input dtype), a dtype name, or None. ``residual``: a
    residual of the input's layout is added before the activation."""
    spec = dict(op="forward", dtype=dtype, shape=list(shape), w=w, b=b, running=running,
                use_input_stats=use_input_stats, activation=activation, store_stats=store_stats,
                write_y=write_y, layout=layout, per_sample=per_sample, tile_limit=tile_limit,
                device=device, clusters=clusters, residual=residual)
    return _with_eps(spec, eps)


def bwd(dtype, shape=(2, 8, 32, 32), *, w="same", b="same", use_input_stats=True, activation=0,
        need_dw=True, need_db=True, layout="contiguous", tile_limit=None, device=DEFAULT_DEVICE,
        clusters=False, eps=1e-5, residual=False):
    """``launch.backward``: the ``_bwd`` launch and, when dweight / dbias are needed,
    ``_sum_partials_over_n``. ``residual``: the residual's gradient is written too."""
    spec = dict(op="backward", dtype=dtype, shape=list(shape), w=w, b=b,
                use_input_stats=use_input_stats, activation=activation, need_dw=need_dw,
                need_db=need_db, layout=layout, tile_limit=tile_limit, device=device,
                clusters=clusters, residual=residual)
    return _with_eps(spec, eps)


def stats_bwd(dtype, shape=(2, 8, 32, 32), *, layout="contiguous", device=DEFAULT_DEVICE,
              clusters=False):
    """``launch.stats_backward``: the gradient through per-plane (mean, std), ``_stats_bwd``."""
    return dict(op="stats_backward", dtype=dtype, shape=list(shape), layout=layout,
                device=device, clusters=clusters)


def update(dtype, running="fp32", n=2, c=8, hw=1024):
    """``launch.update_running_stats`` (stats buffer in the accumulation dtype of ``dtype``)."""
    return dict(op="update", dtype=dtype, running=running, n=n, c=c, hw=hw)


def _with_eps(spec, eps):
    """eps enters a variant's name only when it is not the default (eps == 0 compiles its own
    exact-division kernels)."""
    if eps != 1e-5:
        spec["eps"] = eps
    return spec


def spec_name(spec) -> str:
    skip = {"op", "dtype", "shape"}
    parts = [spec["op"], spec["dtype"]]
    if "shape" in spec:
        parts.append("x".join(map(str, spec["shape"])))
    for k, v in spec.items():
        if k in skip or v is None or v is False or (k == "layout" and v == "contiguous"):
            continue
        if k == "device":
            if v != DEFAULT_DEVICE:
                parts.append(v)
            continue
        parts.append(k if v is True else f"{k}={v}")
    return "-".join(parts)


# ------------------------------------------------------------------------------------ workers

def worker_env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # register / spill counts, parsed from ptxas -v
    # A kernel specialized the same way for two variants would come from the cache the second
    # time, and the cache keeps no ptxas log: compile every time so that each report has one.
    env["TRITON_ALWAYS_COMPILE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_worker(specs, workdir, jobs=2, timeout=600, sass=False):
    """Compiles ``specs`` in ``jobs`` worker subprocesses (TRITON_INTERPRET unset, a fresh
    TRITON_CACHE_DIR under ``workdir`` so that every kernel really is compiled). ``sass``: also
    disassemble each NVIDIA cubin and count its instructions (perf/sass_flow.py).

    Returns {"triton": version, "skip": None or why AOT compilation is impossible here,
    "results": one report per kernel launch (a spec may launch several kernels), "logs": ...}.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chunks = [specs[i::jobs] for i in range(jobs) if specs[i::jobs]]
    procs = []
    for i, chunk in enumerate(chunks):
        spec_path, out_path = workdir / f"spec{i}.json", workdir / f"result{i}.json"
        spec_path.write_text(json.dumps({"specs": chunk, "sass": sass}))
        cmd = [sys.executable, "-m", "perf.aot_worker", str(spec_path), str(out_path)]
        procs.append((subprocess.Popen(cmd, env=worker_env(workdir / f"cache{i}"), cwd=str(ROOT),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                      out_path))
    merged = {"triton": None, "skip": None, "kernels": None, "unavailable": {}, "results": [],
              "logs": []}
    for proc, out_path in procs:
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            log += "\n[worker timed out]"
        merged["logs"].append(log)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"AOT worker failed (rc={proc.returncode}):\n{log[-6000:]}")
        out = json.loads(out_path.read_text())
        merged["triton"] = out["triton"]
        merged["kernels"] = out.get("kernels")
        merged["skip"] = merged["skip"] or out["skip"]
        merged["unavailable"].update(out.get("unavailable", {}))
        merged["results"].extend(out["results"])
    return merged
