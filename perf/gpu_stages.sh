#!/usr/bin/env bash
# The test suite and the benchmarks on a CUDA machine, in stages. Each stage stops starting new
# work once its time budget is spent, so a run cut short still keeps what it finished. Run from
# the repository root:
#
#   bash perf/gpu_stages.sh tests    # the whole suite on CUDA, CUDA-only slow tests included
#   bash perf/gpu_stages.sh perf-a   # workload classes, contiguous and channels_last
#   bash perf/gpu_stages.sh perf-b   # plane sweep, then torch.compile on the workload classes
#   bash perf/gpu_stages.sh peers    # FlagGems and Liger-Kernel on the workload classes
#   bash perf/gpu_stages.sh models   # training steps of real networks (perf.models), one run each
#
# On a machine without a package registry, put the peers' wheels in .whl/ (git-ignored; e.g.
# pip download --no-deps -d .whl flag-gems==5.0.2 liger-kernel sqlalchemy PyYAML): the peers
# stage installs them from there without their dependencies.
#
# BUDGET_S (default 560): seconds after which a stage starts nothing new.
# RESULTS_DIR (default gpu-results/): the stage's outputs: env.txt (GPU, driver, torch, triton,
# commit, date), tests.log or perf.log, and copies of the CSV, summary and plots it produced.
#
# Each perf stage runs perf.report once per shape class; every run merges its rows into
# perf/results/<gpu>.csv and redraws the plots, so an interrupted stage keeps the classes it
# finished, and a later stage adds to the same CSV. torch.compile is left out of the wide sweeps:
# inductor needs tens of seconds per shape and dtype.
set -u
stage=${1:?usage: bash perf/gpu_stages.sh tests|perf-a|perf-b|peers|models}
results=${RESULTS_DIR:-gpu-results}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$results"
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
py=${PYTHON:-python3}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    $py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
"cuda", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")'
    git log --oneline -1 2>/dev/null
} >"$results/env.txt" 2>&1
cat "$results/env.txt"

report() {  # report CLASSES [more perf.report args]: one run per class while time is left
    local classes=$1
    shift
    for cls in ${classes//,/ }; do
        if [ "$(left)" -lt 60 ]; then
            echo "SKIPPED $cls: under 60 s left" | tee -a "$results/perf.log"
            continue
        fi
        echo "== $cls ($(left) s left)" | tee -a "$results/perf.log"
        timeout "$(left)" $py -m perf.report --classes "$cls" "$@" >>"$results/perf.log" 2>&1 \
            || echo "perf.report $cls exited $?" | tee -a "$results/perf.log"
    done
    cp perf/results/*.csv perf/results/*.md "$results"/ 2>/dev/null
    cp plots/*.png "$results"/ 2>/dev/null
    tail -n 40 "$results/perf.log"
}

models() {  # models NETWORKS: one perf.models run per network while time is left (each merges its rows)
    for net in ${1//,/ }; do
        if [ "$(left)" -lt 90 ]; then
            echo "SKIPPED $net: under 90 s left" | tee -a "$results/models.log"
            continue
        fi
        echo "== $net ($(left) s left)" | tee -a "$results/models.log"
        timeout "$(left)" $py -m perf.models --networks "$net" >>"$results/models.log" 2>&1 \
            || echo "perf.models $net exited $?" | tee -a "$results/models.log"
    done
    for f in perf/results/models/*.csv perf/results/models/*.md; do
        [ -e "$f" ] && cp "$f" "$results/models_$(basename "$f")"
    done
    cp plots/*_models.png "$results"/ 2>/dev/null
    tail -n 40 "$results/models.log"
}

case "$stage" in
tests)
    # -n 8: the JIT compiles every kernel variant the suite touches; 16 cores share the work
    # (loadfile: one worker per test file, so the AOT module fixture compiles its set once).
    timeout "$(left)" $py -m pytest -q -rfEs --runslow -n 8 --dist loadfile -p no:cacheprovider \
        --durations=15 >"$results/tests.log" 2>&1
    echo "pytest exit $?" >>"$results/tests.log"
    tail -n 60 "$results/tests.log"
    ;;
perf-a)
    report style_transfer_2d,gan_2d,nnunet_3d,style_transfer_2d_channels_last,nnunet_3d_channels_last,tiny_planes,huge_planes \
        --providers triton_instnorm,torch_eager
    ;;
perf-b)
    report plane_sweep --providers triton_instnorm,torch_eager --dtypes bfloat16,float32
    report style_transfer_2d,gan_2d,nnunet_3d --providers torch_compile --dtypes bfloat16
    ;;
peers)
    if [ -d .whl ]; then
        $py -m pip install --quiet --no-index --no-deps --find-links .whl \
            flag-gems liger-kernel sqlalchemy PyYAML 2>&1 | tail -n 3
    fi
    report style_transfer_2d,gan_2d,nnunet_3d,nnunet_3d_channels_last,tiny_planes,huge_planes \
        --providers triton_instnorm,flag_gems,liger_groupnorm
    ;;
models)
    # The 2-d networks first; the 3-d U-Nets compile longest.
    models style_transfer,cyclegan_b1,cyclegan_b4,adain,unet3d,unet3d_channels_last
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
