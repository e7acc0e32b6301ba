#!/usr/bin/env bash
# The benchmark, then the test suite, on a CUDA machine in one command within a wall-clock budget,
# everything in one directory. From the repository root:
#
#   bash perf/first_light.sh [OUT]             # OUT defaults to first-light/ (git-ignored)
#   bash perf/first_light.sh --dry-run [OUT]   # the same steps on the CPU through Triton's
#                                              # interpreter: smoke shapes of three classes,
#                                              # a tiny test selection
#
# BUDGET_S (default 420): seconds for the whole run. The benchmark gets BENCH_PCT (default 60)
# percent of it and the suite the rest; each step starts no new work past its share and keeps
# what finished (perf.report rewrites its CSV after every shape and dtype; pytest skips the
# tests that would start after the deadline). Leftover time passes to the next step.
#
# OUT holds at most 8 files: env.txt (GPU, driver, torch, triton, commit, date, which peers and
# cluster launches can run), first_light.log (every step's progress), <GPU>.csv and <GPU>.md
# (perf.report's CSV and summary, rows of all steps merged), plots.tar (perf.report's three
# plots, plots/<GPU>_*.png), junit.xml and tests.log (pytest's results and 40 slowest tests).
# The CSV, summary and plots are committed as they are: perf/results/ and plots/.
#
# The benchmark, most important first: (1) warm-up: every case below run once, untimed, by
# several processes at once, so Triton's and inductor's compiles fill their on-disk caches in
# parallel (up to 25% of the benchmark's share); (2) triton_instnorm vs eager vs the copy roof,
# every shape class, bfloat16 and float32, forward, backward, forward+backward (until 60%);
# (3) torch.compile on style_transfer_2d, gan_2d and nnunet_3d (until 80%); (4)
# triton_instnorm_clusters (TRITON_INSTNORM_CLUSTERS=1) where the package launches clusters with
# the installed Triton (until 90%); (5) the peers, FlagGems and Liger-Kernel, if they import.
# The suite: the default and perf tiers with --runslow, pytest-xdist over all cores, whole files
# per worker, the files that compile most first.
#
# Peers on a machine without a package registry: download their wheels elsewhere, for the GPU
# machine's Python (X.Y), into .whl/ (git-ignored, about 9 MiB; carry it along):
#   pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 --python-version X.Y -d .whl \
#       flag-gems==5.0.2 liger-kernel sqlalchemy PyYAML
# every wheel there is installed with --no-deps (WHEELS names another directory). Without
# matplotlib the plots are not drawn (env.txt says so); add its wheels the same way (about 25 MiB:
# matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six).
#
# Left out: float16 and the --module path of the report, the training-step benchmark
# (python -m perf.training), the AOT sweep (a CPU compile, the same on any machine) and the
# smoke compile of every shape class (the benchmark compiles the workload classes at full size).
set -u
dry=0
if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    shift
fi
out=${1:-first-light}
py=${PYTHON:-python3}
budget=${BUDGET_S:-420}
bench=$((budget * ${BENCH_PCT:-60} / 100))
wheels=${WHEELS:-.whl}
cores=$(nproc)
start=$(date +%s)
mkdir -p "$out"
log="$out/first_light.log"
: >"$log"
status=0

say() { echo "$(($(date +%s) - start))s $*" | tee -a "$log"; }
until_pct() { echo $((start + bench * $1 / 100 - $(date +%s))); }  # seconds to a benchmark mark

classes=($($py -c 'from perf.shapes import SHAPE_CLASSES; print(*SHAPE_CLASSES)'))
if [ $dry = 1 ]; then
    export TRITON_INTERPRET=1
    report_args=(--smoke)
    # A 2-d, a split, a channels_last_3d class; one inductor compile on the CPU.
    classes=(gan_2d huge_planes nnunet_3d_channels_last)
    compile_classes=gan_2d compile_dtypes=float32
    tests=(tests/test_perf_library.py tests/test_errors.py)
else
    report_args=()
    compile_classes=style_transfer_2d,gan_2d,nnunet_3d compile_dtypes=bfloat16,float32
    # Most compiling first (inductor, the subprocess pipelines, the AOT compiles), then the rest.
    tests=(tests/test_compile.py tests/test_perf_training.py tests/test_perf_smoke.py
           tests/test_onnx.py tests/test_perf_providers.py tests/test_fusion.py
           tests/test_aot_compile.py tests/test_numerics.py tests/test_backward.py
           tests/test_double_backward.py tests/test_layouts.py tests/test_split.py)
    for f in tests/test_*.py; do
        case " ${tests[*]} " in *" $f "*) ;; *) tests+=("$f") ;; esac
    done
fi
report=(-m perf.report "${report_args[@]}" --dtypes bfloat16,float32 --out "$out"
        --plots "$out/plots")
all_classes=$(IFS=,; echo "${classes[*]}")

if [ -d "$wheels" ]; then
    say "installing the peers' wheels from $wheels"
    $py -m pip install --quiet --no-index --no-deps "$wheels"/*.whl >>"$log" 2>&1 || status=1
fi
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    git log -1 --format='commit %H %s' 2>/dev/null
    [ $dry = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
        --format=csv,noheader
} >"$out/env.txt" 2>&1
# Versions and devices into env.txt; the peers and the cluster provider that can run here (or -).
read -r peers clusters < <($py - 2>>"$out/env.txt" <<'EOF'
import sys, torch, triton
from perf import machine, providers, schema
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, file=sys.stderr)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.multi_processor_count, "SMs", p.total_memory >> 20, "MiB", file=sys.stderr)
try:
    import matplotlib
    print("matplotlib", matplotlib.__version__, file=sys.stderr)
except ImportError:
    print("matplotlib missing: no plots (the CSV can redraw them elsewhere)", file=sys.stderr)
why = {p: providers.unavailable_reason(p, machine.interpreting())
       for p in (*schema.PEER_PROVIDERS, schema.CLUSTERS)}
print("\n".join(f"{p}: {'unavailable: ' + w if w else 'available'}" for p, w in why.items()),
      file=sys.stderr)
print(",".join(p for p in schema.PEER_PROVIDERS if why[p] is None) or "-",
      "-" if why[schema.CLUSTERS] else schema.CLUSTERS)
EOF
)
[ "$peers" = - ] && peers=
[ "$clusters" = - ] && clusters=
cat "$out/env.txt" >>"$log"
part() {  # part NAME MARK_PCT ARGS...: perf.report until the mark; grace for one last case
    local name=$1 left
    left=$(until_pct "$2")
    shift 2
    if [ "$left" -lt 10 ]; then
        say "$name: SKIPPED, its share of the budget is spent"
        return
    fi
    say "$name: perf.report within $left s"
    timeout -k 10 $((left + 60)) $py "${report[@]}" --budget "$left" "$@" >>"$log" 2>&1
    local rc=$?
    [ $rc = 0 ] || { say "$name: perf.report exited $rc"; status=1; }
}

# The warm-up: the classes dealt out to one process per core (at most one per class), each
# running its classes once per provider and direction, torch.compile first where it is timed.
procs=$((cores < ${#classes[@]} ? cores : ${#classes[@]}))
warm_end=$((start + bench / 4))
say "warm-up: $procs processes, within $((warm_end - $(date +%s))) s"
warm() {  # warm CLASSES ARGS...: one untimed perf.report while the warm-up has time left
    local left=$((warm_end - $(date +%s)))
    [ -n "$1" ] && [ $left -gt 0 ] || return 0
    TORCHINDUCTOR_COMPILE_THREADS=1 timeout -k 5 $left $py "${report[@]}" --warm --classes "$@"
}
for ((w = 0; w < procs; w++)); do
    mine=() compiled=()
    for ((j = w; j < ${#classes[@]}; j += procs)); do
        mine+=("${classes[j]}")
        case ",$compile_classes," in *",${classes[j]},"*) compiled+=("${classes[j]}") ;; esac
    done
    (
        IFS=,
        warm "${compiled[*]}" --dtypes "$compile_dtypes" --providers torch_compile
        warm "${mine[*]}" --providers "triton_instnorm${peers:+,$peers}${clusters:+,$clusters}"
    ) >"$out/warm.$w.log" 2>&1 &
done
wait
for ((w = 0; w < procs; w++)); do
    tail -n 1 "$out/warm.$w.log" | sed "s/^/warm-up $w: /" >>"$log"
    rm -f "$out/warm.$w.log"
done

part "ours, eager, copy" 60 --providers triton_instnorm,torch_eager --classes "$all_classes"
part "torch.compile" 80 --providers torch_compile --classes "$compile_classes" \
    --dtypes "$compile_dtypes"
if [ -n "$clusters" ]; then
    part "clusters" 90 --providers "$clusters" --classes "$all_classes"
else
    say "clusters: not run (see env.txt)"
fi
if [ -n "$peers" ]; then
    part "peers" 100 --providers "$peers" --classes "$all_classes"
else
    say "peers: not run (see env.txt)"
fi

deadline=$((start + budget - 15))
say "suite: ${#tests[@]} files, $cores workers, until $((deadline - $(date +%s))) s from now"
PERF_DEADLINE=$deadline timeout -s INT -k 15 $((deadline - $(date +%s) + 20)) \
    $py -m pytest -q -rfEs -m "" --runslow -n "$cores" --dist loadfile -p perf.deadline \
    -p no:cacheprovider --durations=40 --junitxml="$out/junit.xml" \
    --deselect tests/test_aot_compile.py::test_sweep_compiles_for_sm90 "${tests[@]}" \
    >"$out/tests.log" 2>&1
rc=$?
tail -n 3 "$out/tests.log" | tee -a "$log"
[ $rc = 0 ] || { say "pytest exited $rc"; status=1; }

if [ -d "$out/plots" ]; then
    tar -cf "$out/plots.tar" -C "$out" plots && rm -r "$out/plots"
fi
say "done: $(ls "$out" | tr '\n' ' ')"
for f in env.txt first_light.log junit.xml tests.log plots.tar; do
    [ -s "$out/$f" ] || { say "missing: $out/$f"; status=1; }
done
ls "$out"/*.csv "$out"/*.md >/dev/null 2>&1 || { say "missing: the CSV and summary"; status=1; }
exit $status
