#!/usr/bin/env bash
# Issue 8's GPU checks in one run, for a session that has the GPU machine (about 8 minutes on one H100/H200):
#   1. the tests that skip without CUDA (renderer and planners under torch.cuda.set_sync_debug_mode("error"),
#      eager and compiled; nvJPEG decode against libjpeg);
#   2. the benchmarks of docs/gpu_pipeline.md against the issue's targets (CIFAR-shaped symmetric MoCo v2 with a
#      compiled step, eager and compiled views; MoCo v3 ResNet-50 on JPEG bytes decoded on the GPU).
# Everything goes to OUT_DIR (default $OUT, else runs/gpu_session): a log per part, one JSON per benchmark.
#
# Usage, from the repository root:  bash benchmarks/gpu_session.sh [OUT_DIR]
# GPU_SESSION_PARTS picks parts (default: all, "tests cifar render cifar_compiled_views imagenet_jpeg"); each part
# has its own time limit (150 + 180 + 90 + 150 + 150 s at most), so a device call capped at 600 s can take
# "tests cifar render" and a second one the rest.
# It needs torch with CUDA, torchvision, numpy, pyyaml, pillow, matplotlib (the GPU machine has them) and runs the
# package from src/ without installing it. pytest and hypothesis are needed for part 1 only; without them part 1
# is skipped with a message (carry wheels: pip download pytest hypothesis -d .gpu_wheels, then add .gpu_wheels to
# the run's carry; this script installs from there when it exists).
# GPU_SESSION_QUICK=1 shrinks every benchmark to a few steps (to try the script on a CPU).
set -uo pipefail

OUT_DIR=${1:-${OUT:-runs/gpu_session}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
STEPS=20
WARMUP=3
CIFAR_WORKERS=16
QUICK=()
if [[ "${GPU_SESSION_QUICK:-0}" == "1" ]]; then
    STEPS=1
    WARMUP=1
    CIFAR_WORKERS=2
    QUICK=(data.batch_size=8)
fi

"$PY" - <<'EOF' | tee "$OUT_DIR/environment.txt"
import platform, torch, torchvision
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

PARTS=" ${GPU_SESSION_PARTS:-tests cifar render cifar_compiled_views imagenet_jpeg} "
want() { [[ "$PARTS" == *" $1 "* ]]; }

if [[ -d .gpu_wheels ]]; then
    "$PY" -m pip install --quiet --no-index --find-links .gpu_wheels pytest hypothesis 2>&1 | tail -2
fi

if ! want tests; then
    :
elif "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    echo "== 1. CUDA-only tests" | tee "$OUT_DIR/pytest_cuda.txt"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda \
        tests/test_gpu_render.py tests/test_gpu_pipeline.py tests/test_batch_planners.py 2>&1 \
        | tail -30 | tee -a "$OUT_DIR/pytest_cuda.txt"
else
    echo "pytest or hypothesis missing: part 1 skipped (see the header of this script)" | tee -a "$OUT_DIR/pytest_cuda.txt"
fi

bench() {  # bench NAME TIMEOUT_S RECIPE ARGS...
    local name=$1 limit=$2 recipe=$3
    shift 3
    want "$name" || return 0
    local overrides=()
    while [[ $# -gt 0 && "$1" != --* ]]; do overrides+=("$1"); shift; done
    overrides+=("${QUICK[@]}")  # after the recipe's own overrides: quick mode wins
    echo "== bench $name: contrastlab bench $recipe ${overrides[*]} $*" | tee "$OUT_DIR/bench_$name.txt"
    timeout "$limit" "$PY" -m contrastlab bench "$recipe" "${overrides[@]}" "$@" --steps "$STEPS" --warmup "$WARMUP" \
        --out "$OUT_DIR/bench_$name.json" 2>&1 \
        | grep -v Warning | tee -a "$OUT_DIR/bench_$name.txt"
}

echo "== 2. benchmarks"
# Targets: gpu/model >= 0.9, gpu/cpu >= 2.5 at 16 workers, a 50k-image epoch < 2.5 s.
bench cifar 180 cifar10/mocov2_r18_500ep method.symmetric=true train.precision=bf16 model.channels_last=true \
    --workers "$CIFAR_WORKERS" --compile
# The renderer alone, eager against compiled (issue: two views of a 512-batch at >= 200k img/s).
bench render 90 cifar10/mocov2_r18_500ep --parts render,compiled_render
# The step fed by compiled views.
bench cifar_compiled_views 150 cifar10/mocov2_r18_500ep method.symmetric=true train.precision=bf16 \
    model.channels_last=true data.compile_views=true --parts model,gpu --compile
# Target: gpu/model >= 0.85 with JPEG decode on the GPU.
bench imagenet_jpeg 150 imagenet/mocov3_r50_100ep data.batch_size=128 train.precision=bf16 model.channels_last=true \
    --shape imagenet --jpeg --workers "$CIFAR_WORKERS" --parts model,gpu,render,compiled_render

echo "done: $OUT_DIR"
