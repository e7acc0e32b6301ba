"""The worker side of ahead-of-time compilation (perf/aot.py): ``python -m perf.aot_worker
SPEC.json RESULT.json``, with TRITON_INTERPRET unset.

How a variant is built: the real host code in ``launch.py`` is called with CPU tensors of the
shapes, dtypes and layouts of the variant (never touched: ``torch.empty`` of any size costs no
memory until written), with the kernels swapped for recorders. The recorded arguments are then
specialized exactly as ``JITFunction.run`` does on a GPU, by Triton's own binder
(``create_function_from_signature`` and ``_pack_args``): ints equal to 1 and None pointers become
constexprs, ints / pointers divisible by 16 get ``tt.divisibility``, floats are fp32, and the same
holds inside the tuple views the kernels take. An element of a tuple argument is reported as
``name[i]`` (``x[3]``: the input's spatial stride). Launches that specialize identically (same
kernel, signature, constexprs, divisibility, warps, CTAs and target) are compiled once and
reported for each variant.

Each launch is compiled down to the cubin (hsaco on AMD); the report holds registers and spills
(ptxas -v), a summary of the PTX, and with ``"sass": true`` in the job the instruction counts of
the disassembled cubin (perf/sass_flow.py).
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perf.aot import DEFAULT_DEVICE, spec_name

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


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
                eps = spec.get("eps", 1e-5)
                residual = torch.empty_like(x) if spec.get("residual") else None
                if op == "forward":
                    rm = rv = None
                    if spec["running"]:
                        rm = torch.empty(c, dtype=_torch_dtype(spec["running"]))
                        rv = torch.empty(c, dtype=_torch_dtype(spec["running"]))
                    launch.forward(x, w, b, rm, rv, spec["use_input_stats"], eps, act, 0.01,
                                   spec["store_stats"], write_y=spec["write_y"],
                                   residual=residual)
                elif op == "backward":
                    dy = torch.empty_like(x)
                    stats = torch.empty((constants.NUM_STATS, n * c),
                                        dtype=launch.acc_dtype(x.dtype))
                    launch.backward(dy, x, w, b, stats, spec["use_input_stats"], eps, act, 0.01,
                                    spec["need_dw"], spec["need_db"], residual=residual)
                else:
                    raise ValueError(f"unknown op {op!r}")
    finally:
        for name, kern in originals.items():
            setattr(launch, name, kern)
    return sink


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


def compile_launch(rec, gpu, sass=False, cache=None, spec=None):
    """Compiles one recorded launch for ``gpu``'s architecture (down to the cubin / hsaco) and
    returns a JSON-able report; ``sass``: with the SASS instruction counts (NVIDIA). ``cache``
    (a dict): a launch specialized like one compiled before reuses its report (``duplicate_of``
    names the variant ``spec`` that compiled it)."""
    from triton.compiler import make_backend

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
    geometry = rec["kwargs"].get("geometry")
    if geometry is not None:
        report["geometry"] = [int(g) for g in geometry]  # (N * C, C, HW, rows per group)
    key = _compile_key(report)
    if cache is not None and key in cache:
        first_spec, first = cache[key]
        return dict(first, grid=report["grid"], geometry=report.get("geometry"),
                    duplicate_of=first_spec, seconds=0.0)
    report["duplicate_of"] = None
    _compile(report, kernel, (signature, constexprs, attrs, options), target, gpu, sass)
    if cache is not None:
        cache[key] = (spec, report)
    return report


def _compile(report, kernel, specialization, target, gpu, sass):
    import triton
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialization
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
    if sass:
        from perf import sass_flow
        report["sass"] = sass_flow.count(disassemble(compiled.asm["cubin"]), report["kernel"])
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


def disassemble(cubin):
    """The SASS of a cubin, as ``nvdisasm -c`` prints it (labels for branch targets)."""
    import triton

    tool = _nvdisasm_path(triton)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], check=True, capture_output=True,
                              text=True).stdout


def _nvdisasm_path(triton):
    try:
        return triton.knobs.nvidia.nvdisasm.path
    except AttributeError:  # a Triton without knobs: the binary it ships
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def _compile_key(report):
    return (report["kernel"], json.dumps(report.get("signature"), sort_keys=True),
            json.dumps(report.get("constexprs"), sort_keys=True),
            json.dumps(report.get("divisible16")), report["num_warps"], report["num_ctas"],
            report["arch"])


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
        compiled = {}  # compile key -> (first variant, its report)
        for spec in job["specs"]:
            gpu = device.EMULATED[spec.get("device", DEFAULT_DEVICE)]
            if gpu.vendor == "amd":
                why = amd_backend_available(gpu.arch)
                if why:
                    out["unavailable"][gpu.arch] = why
                    continue
            for rec in capture(spec):
                name = spec_name(spec)
                report = compile_launch(rec, gpu, sass=job.get("sass", False), cache=compiled,
                                        spec=name)
                report["spec"] = name
                print(f"{report['spec']}: {report['kernel']} ok={report['ok']} "
                      f"{report['seconds']}s", flush=True)
                out["results"].append(report)
    Path(out_path).write_text(json.dumps(out, indent=1, default=repr))


if __name__ == "__main__":
    main(sys.argv)
