"""Ahead-of-time compilation of the kernels for a GPU target, on a machine without a GPU.

The test suite runs the kernels through Triton's interpreter, which never invokes the real
compiler (frontend type checks, constexpr folding, TTGIR passes, LLVM, ptxas). This module
compiles them for real with ``triton.compile(ASTSource(...), target=GPUTarget(...))``.

Each variant names the GPU it is planned and compiled for (``device``: a name of
``device.EMULATED``, H100 by default) and whether cluster launches are on (``clusters``): the host
code takes that GPU's launch decisions through ``TRITON_INSTNORM_EMULATE`` /
``TRITON_INSTNORM_CLUSTERS``, and the kernel is compiled for its architecture (``sm_90``,
``sm_100``, ``sm_80``: PTX and ptxas; ``gfx942``: AMDGCN).

How a variant is built: the real host code in ``launch.py`` is called with CPU tensors of the
shapes, dtypes and layouts of the variant, with the kernels swapped for recorders. The recorded
arguments are then specialized exactly as ``JITFunction.run`` does on a GPU, by Triton's own
binder (``create_function_from_signature`` and ``_pack_args``): ints equal to 1 and None
pointers become constexprs, ints / pointers divisible by 16 get ``tt.divisibility``, floats are
fp32, and the same holds inside the tuple views the kernels take. An element of a tuple argument
is reported as ``name[i]`` (``x[3]``: the input's spatial stride).

This must run with TRITON_INTERPRET unset: under the interpreter ``@triton.jit`` returns
``InterpretedFunction`` objects (the kernels *and* the helpers they call), which the compiler
cannot use. The tests therefore run ``python tests/_aot.py SPEC.json RESULT.json`` in a
subprocess (``run_worker``); nothing in this module imports triton at import time.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Kernel arguments / options that the JIT does not treat as kernel parameters.
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ---------------------------------------------------------------------------------------------
# Variant descriptions (plain dicts, JSON-serializable). Each names one host-side call.
# ---------------------------------------------------------------------------------------------

DEFAULT_DEVICE = "h100"


def fwd(dtype, shape=(2, 8, 32, 32), *, w="same", b="same", running=None, use_input_stats=True,
        activation=0, store_stats=True, write_y=True, layout="contiguous", per_sample=False,
        tile_limit=None, device=DEFAULT_DEVICE, clusters=False, residual=False):
    """``launch.forward``. w / b: "same" (input dtype), a dtype name, or None. ``residual``: a
    residual of the input's layout is added before the activation."""
    return dict(op="forward", dtype=dtype, shape=list(shape), w=w, b=b, running=running,
                use_input_stats=use_input_stats, activation=activation, store_stats=store_stats,
                write_y=write_y, layout=layout, per_sample=per_sample, tile_limit=tile_limit,
                device=device, clusters=clusters, residual=residual)


def bwd(dtype, shape=(2, 8, 32, 32), *, w="same", b="same", use_input_stats=True, activation=0,
        need_dw=True, need_db=True, layout="contiguous", tile_limit=None, device=DEFAULT_DEVICE,
        clusters=False, residual=False):
    """``launch.backward``: the ``_bwd`` launch and, when dweight / dbias are needed,
    ``_sum_partials_over_n``. ``residual``: the residual's gradient is written too."""
    return dict(op="backward", dtype=dtype, shape=list(shape), w=w, b=b,
                use_input_stats=use_input_stats, activation=activation, need_dw=need_dw,
                need_db=need_db, layout=layout, tile_limit=tile_limit, device=device,
                clusters=clusters, residual=residual)


def stats_bwd(dtype, shape=(2, 8, 32, 32), *, layout="contiguous", device=DEFAULT_DEVICE,
              clusters=False):
    """``launch.stats_backward``: the gradient through per-plane (mean, std), ``_stats_bwd``."""
    return dict(op="stats_backward", dtype=dtype, shape=list(shape), layout=layout,
                device=device, clusters=clusters)


def update(dtype, running="fp32", n=2, c=8, hw=1024):
    """``launch.update_running_stats`` (stats buffer in the accumulation dtype of ``dtype``)."""
    return dict(op="update", dtype=dtype, running=running, n=n, c=c, hw=hw)


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


# ---------------------------------------------------------------------------------------------
# Pytest side: run the worker in a subprocess with TRITON_INTERPRET unset.
# ---------------------------------------------------------------------------------------------

def worker_env(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # register / spill counts, parsed from ptxas -v
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_worker(specs, workdir, jobs=2, timeout=600):
    """Compiles ``specs`` in ``jobs`` worker subprocesses (TRITON_INTERPRET unset, a fresh
    TRITON_CACHE_DIR under ``workdir`` so that every kernel really is compiled).

    Returns {"triton": version, "skip": None or why AOT compilation is impossible here,
    "results": one report per kernel launch (a spec may launch several kernels), "logs": ...}.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chunks = [specs[i::jobs] for i in range(jobs) if specs[i::jobs]]
    procs = []
    for i, chunk in enumerate(chunks):
        spec_path, out_path = workdir / f"spec{i}.json", workdir / f"result{i}.json"
        spec_path.write_text(json.dumps({"specs": chunk}))
        cmd = [sys.executable, str(Path(__file__).resolve()), str(spec_path), str(out_path)]
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


# ---------------------------------------------------------------------------------------------
# Worker side (TRITON_INTERPRET unset): capture the launches, specialize, compile.
# ---------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}[name]


def _make_input(spec):
    import torch
    dtype = _torch_dtype(spec["dtype"])
    shape = spec["shape"]
    if spec.get("layout") == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.empty(shape, dtype=dtype).to(memory_format=fmt)
    if spec.get("layout") == "strided":  # every other spatial element: spatial stride 2
        return torch.empty(shape[:-1] + [2 * shape[-1]], dtype=dtype)[..., ::2]
    return torch.empty(shape, dtype=dtype)


def _param(spec, key, n, c):
    import torch
    which = spec[key]
    if which is None:
        return None
    dtype = _torch_dtype(spec["dtype"] if which == "same" else which)
    return torch.empty((n, c) if spec.get("per_sample") else (c,), dtype=dtype)


class _Recorder:
    """Stands in for a JITFunction in ``launch``: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, name, kernel, sink):
        self.name, self.kernel, self.sink = name, kernel, sink
        self.fn = kernel.fn  # launch.run counts launches by kernel.fn.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(dict(name=self.name, kernel=self.kernel, grid=tuple(grid),
                                  args=args, kwargs=kwargs))
        return launch


def launched_kernels():
    """{name: JITFunction} for every kernel ``launch.py`` can launch (worker side only)."""
    from triton.runtime.jit import JITFunction

    from triton_instnorm import launch
    return {name: obj for name, obj in vars(launch).items() if isinstance(obj, JITFunction)}


@contextlib.contextmanager
def planned_for(spec):
    """The launch decisions of the spec's GPU, clusters on or off (the variables launch.py reads
    at every decision)."""
    from triton_instnorm import device

    values = {device.EMULATE_ENV: spec.get("device", DEFAULT_DEVICE),
              device.CLUSTERS_ENV: "1" if spec.get("clusters") else "0"}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield device.EMULATED[values[device.EMULATE_ENV]]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def capture(spec):
    """Calls the real host code for ``spec`` and returns the kernel launches it makes."""
    import torch

    from triton_instnorm import heuristics, launch
    from triton_instnorm.kernels import constants

    sink = []
    originals = launched_kernels()
    for name, kern in originals.items():
        setattr(launch, name, _Recorder(name, kern, sink))
    limit = (heuristics.tile_limit(spec["tile_limit"]) if spec.get("tile_limit")
             else contextlib.nullcontext())
    try:
        with limit, planned_for(spec):
            op = spec["op"]
            if op == "update":
                acc = torch.float64 if spec["dtype"] == "fp64" else torch.float32
                n, c = spec["n"], spec["c"]
                stats = torch.empty((constants.NUM_STATS, n * c), dtype=acc)
                rm = torch.empty(c, dtype=_torch_dtype(spec["running"]))
                rv = torch.empty(c, dtype=_torch_dtype(spec["running"]))
                launch.update_running_stats(stats, rm, rv, n, c, spec["hw"], 0.1)
            elif op == "stats_backward":
                x = _make_input(spec)
                n, c = x.shape[0], x.shape[1]
                acc = launch.acc_dtype(x.dtype)
                stats = torch.empty((constants.NUM_STATS, n * c), dtype=acc)
                dmean, dstd = torch.empty((n, c), dtype=acc), torch.empty((n, c), dtype=acc)
                launch.stats_backward(dmean, dstd, x, stats, 1e-5)
            else:
                x = _make_input(spec)
                n, c = x.shape[0], x.shape[1]
                w, b = _param(spec, "w", n, c), _param(spec, "b", n, c)
                act = spec["activation"]
                residual = torch.empty_like(x) if spec.get("residual") else None
                if op == "forward":
                    rm = rv = None
                    if spec["running"]:
                        rm = torch.empty(c, dtype=_torch_dtype(spec["running"]))
                        rv = torch.empty(c, dtype=_torch_dtype(spec["running"]))
                    launch.forward(x, w, b, rm, rv, spec["use_input_stats"], 1e-5, act, 0.01,
                                   spec["store_stats"], write_y=spec["write_y"],
                                   residual=residual)
                elif op == "backward":
                    dy = torch.empty_like(x)
                    stats = torch.empty((constants.NUM_STATS, n * c),
                                        dtype=launch.acc_dtype(x.dtype))
                    launch.backward(dy, x, w, b, stats, spec["use_input_stats"], 1e-5, act, 0.01,
                                    spec["need_dw"], spec["need_db"], residual=residual)
                else:
                    raise ValueError(f"unknown op {op!r}")
    finally:
        for name, kern in originals.items():
            setattr(launch, name, kern)
    return sink


def _split_launch(kernel, args, kwargs):
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    return args, kwargs, options


def jit_specialization(kernel, backend, args, kwargs):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` computes them."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    bound_args, specialization, opts = binder(*args, **kwargs, **options)
    options_obj, signature, constexprs, attrs = kernel._pack_args(backend, options, bound_args,
                                                                  specialization, opts)
    return signature, constexprs, attrs, options_obj.__dict__


def path_name(names, path):
    """``x`` for argument ``x``, ``x[3]`` for element 3 of a tuple argument."""
    return names[path[0]] + "".join(f"[{i}]" for i in path[1:])


_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptx_summary(ptx):
    """Counts of the PTX instructions the tests and the report look at."""
    def count(pattern):
        return len(re.findall(pattern, ptx))
    scalar = r"(?:\.(?!v[248]\.)[A-Za-z0-9_:]+)*\.(?:b|u|f|s)(?:8|16|32|64)\b"  # not .v2/.v4
    return {
        "ld_global_v4": count(r"ld\.global(?:\.[A-Za-z0-9_:]+)*\.v4\."),
        "ld_global_v2": count(r"ld\.global(?:\.[A-Za-z0-9_:]+)*\.v2\."),
        "ld_global_scalar": count(r"ld\.global" + scalar),
        "st_global_v4": count(r"st\.global(?:\.[A-Za-z0-9_:]+)*\.v4\."),
        "st_global_v2": count(r"st\.global(?:\.[A-Za-z0-9_:]+)*\.v2\."),
        "st_global_scalar": count(r"st\.global" + scalar),
        # 16 bytes per lane: four 32-bit or two 64-bit words
        "ld_global_16B": count(r"ld\.global(?:\.[A-Za-z0-9_:]+)*\.v4\.[bfus]32")
        + count(r"ld\.global(?:\.[A-Za-z0-9_:]+)*\.v2\.[bfus]64"),
        "st_global_16B": count(r"st\.global(?:\.[A-Za-z0-9_:]+)*\.v4\.[bfus]32")
        + count(r"st\.global(?:\.[A-Za-z0-9_:]+)*\.v2\.[bfus]64"),
        "div_rn_f32": count(r"div\.rn\.f32"),
        "div_full_f32": count(r"div\.full\.f32"),
        "div_approx_f32": count(r"div\.approx(?:\.ftz)?\.f32"),
        "div_rn_f64": count(r"div\.rn\.f64"),
        "rcp_rn_f64": count(r"rcp\.rn\.f64"),
        "sqrt_rn_f32": count(r"sqrt\.rn\.f32"),
        "sqrt_approx_f32": count(r"sqrt\.approx(?:\.ftz)?\.f32"),
        "sqrt_rn_f64": count(r"sqrt\.rn\.f64"),
        "f64_ops": count(r"\.f64\b"),
        "cvt_bf16": count(r"cvt\.rn\.bf16"),
        "calls": count(r"\bcall(?:\.uni)?\b"),
        "cluster_ctas": [int(n) for n in re.findall(r"\.reqnctapercluster (\d+)", ptx)],
        "ld_shared_cluster": count(r"ld\.shared::cluster"),
        "barrier_cluster": count(r"barrier\.cluster\.arrive"),
        "lines": ptx.count("\n"),
    }


def i32_scalar_products(ttir):
    """The scalar 32-bit integer products in the TTIR, by the names of their operands: where an
    offset could wrap (a product of sizes must be formed in int64 before it reaches a pointer)."""
    found = re.findall(r"= arith\.muli (%[\w.]+), (%[\w.]+) : i32(?:\s|$)", ttir)
    return sorted({f"{a} * {b}" for a, b in found})


def gpu_target(gpu):
    """The GPUTarget of an emulated ``device.Device``."""
    from triton.backends.compiler import GPUTarget
    if gpu.vendor == "amd":
        return GPUTarget("hip", gpu.arch, gpu.warp_size)
    return GPUTarget("cuda", gpu.capability[0] * 10 + gpu.capability[1], gpu.warp_size)


_AMD_LOAD_RE = r"(?:global|buffer)_load_"
_AMD_STORE_RE = r"(?:global|buffer)_store_"


def amdgcn_summary(asm):
    """Global memory instructions of AMDGCN assembly by width (dwordx4: 16 bytes per lane),
    and the register / spill counts the assembler reports."""
    def count(pattern):
        return len(re.findall(pattern, asm))

    def meta(key):
        found = re.findall(rf"\.{key}:\s+(\d+)", asm)
        return max(map(int, found)) if found else None
    return {
        "ld_x4": count(_AMD_LOAD_RE + r"dwordx4\b"),
        "ld_x2": count(_AMD_LOAD_RE + r"dwordx2\b"),
        "ld_narrow": count(_AMD_LOAD_RE + r"(?:dword|ushort|short_d16(?:_hi)?|ubyte)\b"),
        "st_x4": count(_AMD_STORE_RE + r"dwordx4\b"),
        "st_x2": count(_AMD_STORE_RE + r"dwordx2\b"),
        "st_narrow": count(_AMD_STORE_RE + r"(?:dword|short(?:_d16_hi)?|byte)\b"),
        "vgprs": meta("vgpr_count"), "vgpr_spills": meta("vgpr_spill_count"),
        "sgpr_spills": meta("sgpr_spill_count"),
    }


def compile_launch(rec, gpu):
    """Compiles one recorded launch for ``gpu``'s architecture (down to the cubin / hsaco) and
    returns a JSON-able report."""
    import triton
    from triton.compiler import ASTSource, make_backend

    target = gpu_target(gpu)
    backend = make_backend(target)
    kernel = rec["kernel"]
    signature, constexprs, attrs, options = jit_specialization(kernel, backend, rec["args"],
                                                               rec["kwargs"])
    names = list(signature)
    report = {
        "kernel": rec["name"],
        "grid": list(rec["grid"]),
        "signature": signature,
        "constexprs": {path_name(names, k): repr(v) for k, v in constexprs.items()},
        "divisible16": sorted(path_name(names, k) for k, v in attrs.items() if v),
        "num_warps": options.get("num_warps"),
        "num_ctas": options.get("num_ctas", 1),
        "arch": gpu.arch,
    }
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report.update(ok=False, seconds=round(time.perf_counter() - t0, 2),
                      error=_format_error(exc), log=log.getvalue()[-2000:])
        return report
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if gpu.vendor == "amd":
        asm = compiled.asm.get("amdgcn", "")
        summary = amdgcn_summary(asm)
        report.update(ok=True, stages=sorted(compiled.asm), asm_chars=len(asm),
                      registers=summary["vgprs"], spill_stores=summary["vgpr_spills"],
                      amdgcn_summary=summary)
        return report
    ptx = compiled.asm.get("ptx", "")
    ptxas_log = log.getvalue()
    regs = [int(m) for m in _PTXAS_RE.findall(ptxas_log)]
    spills = [tuple(map(int, m)) for m in _SPILL_RE.findall(ptxas_log)]
    report.update(ok=True, stages=sorted(compiled.asm), ptx_chars=len(ptx),
                  cubin_bytes=len(compiled.asm.get("cubin") or b""),
                  ptx_target=(re.findall(r"\.target (\S+)", ptx) or [None])[0],
                  registers=max(regs) if regs else None,
                  spill_stores=max((s[0] for s in spills), default=None),
                  spill_loads=max((s[1] for s in spills), default=None),
                  shared=getattr(compiled.metadata, "shared", None), ptx_summary=ptx_summary(ptx),
                  i32_scalar_products=i32_scalar_products(str(compiled.asm.get("ttir", ""))))
    return report


def _format_error(exc):
    """The exception and its causes (Triton reports an error inside a called @jit helper as a
    CompilationError at the call site whose __cause__ holds the real message)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}"[-3000:])
        exc = exc.__cause__ or exc.__context__
    return "\n--- caused by ---\n".join(parts)


def nvidia_backend_available():
    """None if ``triton.compile`` for a CUDA sm_90 target can work here, else the reason."""
    import inspect
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # noqa: BLE001
        return f"no NVIDIA backend / AOT API in this Triton: {type(exc).__name__}: {exc}"
    params = inspect.signature(ASTSource.__init__).parameters
    if not {"signature", "constexprs", "attrs"} <= set(params):
        return (f"Triton {triton.__version__}: ASTSource({', '.join(params)}) lacks the "
                "signature/constexprs/attrs API these tests build on")
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as exc:  # noqa: BLE001
        return f"no ptxas for sm_90 in this Triton: {type(exc).__name__}: {exc}"
    return None


def amd_backend_available(arch="gfx942"):
    """None if ``triton.compile`` for an AMD ``arch`` target can work here, else the reason."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        make_backend(GPUTarget("hip", arch, 64))
    except Exception as exc:  # noqa: BLE001
        return f"no AMD backend for {arch} in this Triton: {type(exc).__name__}: {exc}"
    return None


def main(argv):
    spec_path, out_path = argv[1], argv[2]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET must be unset for AOT compilation")
    job = json.loads(Path(spec_path).read_text())
    reason = nvidia_backend_available()
    out = {"triton": None, "skip": reason, "unavailable": {}, "results": []}
    if reason is None:
        import triton

        from triton_instnorm import device
        out["triton"] = triton.__version__
        out["kernels"] = sorted(launched_kernels())
        seen = {}
        for spec in job["specs"]:
            gpu = device.EMULATED[spec.get("device", DEFAULT_DEVICE)]
            if gpu.vendor == "amd":
                why = amd_backend_available(gpu.arch)
                if why:
                    out["unavailable"][gpu.arch] = why
                    continue
            for rec in capture(spec):
                report = compile_launch(rec, gpu)
                key = (report["kernel"], json.dumps(report.get("signature"), sort_keys=True),
                       json.dumps(report.get("constexprs"), sort_keys=True),
                       json.dumps(report.get("divisible16")), report["num_warps"],
                       report["num_ctas"], report["arch"])
                report["spec"] = spec_name(spec)
                report["duplicate_of"] = seen.get(key)
                seen.setdefault(key, report["spec"])
                out["results"].append(report)
                print(f"{report['spec']}: {report['kernel']} ok={report['ok']} "
                      f"{report['seconds']}s", flush=True)
    Path(out_path).write_text(json.dumps(out, indent=1, default=repr))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv)
