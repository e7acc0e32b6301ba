#!/usr/bin/env bash
# What a session with a lent GPU runs, in calls that each fit the device tool's 10-minute limit
# (and its 30 minutes of device time in all). Run from the repository root on the GPU machine:
#
#   bash perf/gpu_session.sh tests    # the whole suite on CUDA, CUDA-only slow tests included
#   bash perf/gpu_session.sh perf-a   # workload classes, contiguous and channels_last (#5)
#   bash perf/gpu_session.sh perf-b   # plane sweep, then torch.compile on the workload classes
#   bash perf/gpu_session.sh peers    # FlagGems and Liger-Kernel on the workload classes
#   bash perf/gpu_session.sh models   # training steps of the networks (perf.models), one run each
#
# The GPU machine reaches no package registry: for the peers stage, download the wheels here first
# (pip download --no-deps -d .whl flag-gems==5.0.2 liger-kernel sqlalchemy PyYAML) and carry
# .whl/ (git-ignored) with the working tree; the stage installs them without their dependencies.
#
# Everything worth keeping is copied to $OUT (the device tool brings it back; at most 8 files):
# tests.log, env.txt, and after a perf stage <device>.csv / .md and the three plots. Copy the CSV
# into perf/results/ here before the next perf stage: each stage merges its rows into the CSV it
# finds, so the file must travel with the working tree.
#
# Each perf stage runs perf.report once per shape class (each run merges its rows and rewrites
# the CSV, so a stage cut short by its deadline keeps the classes it finished) and skips the
# classes it has no time left for. torch.compile is left out of the wide sweeps: inductor needs
# tens of seconds per shape and dtype, which does not fit a 30-minute lease for all 29 shapes.
set -u
stage=${1:?usage: bash perf/gpu_session.sh tests|perf-a|perf-b|peers|models}
OUT=${OUT:-/tmp/gpu_session_out}
BUDGET_S=${BUDGET_S:-560}  # stop starting work after this many seconds
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
py=${PYTHON:-python3}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    $py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
"cuda", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")'
    git log --oneline -1 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

report() {  # report CLASSES [more perf.report args]: one run per class while time is left
    local classes=$1
    shift
    for cls in ${classes//,/ }; do
        if [ "$(left)" -lt 60 ]; then
            echo "SKIPPED $cls: under 60 s left" | tee -a "$OUT/perf.log"
            continue
        fi
        echo "== $cls ($(left) s left)" | tee -a "$OUT/perf.log"
        timeout "$(left)" $py -m perf.report --classes "$cls" "$@" >>"$OUT/perf.log" 2>&1 \
            || echo "perf.report $cls exited $?" | tee -a "$OUT/perf.log"
    done
    cp perf/results/*.csv perf/results/*.md "$OUT"/ 2>/dev/null
    cp plots/*.png "$OUT"/ 2>/dev/null
    tail -n 40 "$OUT/perf.log"
}

models() {  # models NETWORKS: one perf.models run per network while time is left (each merges its rows)
    for net in ${1//,/ }; do
        if [ "$(left)" -lt 90 ]; then
            echo "SKIPPED $net: under 90 s left" | tee -a "$OUT/models.log"
            continue
        fi
        echo "== $net ($(left) s left)" | tee -a "$OUT/models.log"
        timeout "$(left)" $py -m perf.models --networks "$net" >>"$OUT/models.log" 2>&1 \
            || echo "perf.models $net exited $?" | tee -a "$OUT/models.log"
    done
    for f in perf/results/models/*.csv perf/results/models/*.md; do
        [ -e "$f" ] && cp "$f" "$OUT/models_$(basename "$f")"
    done
    cp plots/*_models.png "$OUT"/ 2>/dev/null
    tail -n 40 "$OUT/models.log"
}

case "$stage" in
tests)
    # -n 8: the JIT compiles every kernel variant the suite touches; 16 cores share the work
    # (loadfile: one worker per test file, so the AOT module fixture compiles its set once).
    timeout "$(left)" $py -m pytest -q -rfEs --runslow -n 8 --dist loadfile -p no:cacheprovider \
        --durations=15 >"$OUT/tests.log" 2>&1
    echo "pytest exit $?" >>"$OUT/tests.log"
    tail -n 60 "$OUT/tests.log"
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
    # The 2-d networks first; the 3-d U-Nets compile longest (copy the models CSV back into
    # perf/results/models/ before a second call, as for the perf stages).
    models style_transfer,cyclegan_b1,cyclegan_b4,adain,unet3d,unet3d_channels_last
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
