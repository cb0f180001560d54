#!/usr/bin/env bash
# The GPU checks for a short time on a CUDA machine, as one command:
#   1. build lpqld_fast._C with its CUDA kernels against that machine's torch (sm_90 by default),
#   2. the GPU tests (CUDA + Triton backends against the references, GPU recover), scripts/gpu_probe.py
#      (C++ exceptions under that image's toolchain, host-device syncs per step),
#   3. the benchmarks on the GPU (bench.run --devices cuda), the stage steps eager vs compile vs cudagraphs
#      (bench/stage_compile.py),
#   4. the op test files whole, then the whole suite, with the time that is left.
# Every step has its own time limit inside BUDGET_S (default 540 s) and never stops the next one; logs
# and a one-line-per-step summary go to $OUT (default gpu_out/), the bench folder as bench.tar.gz
# (bench.log inside: some remote runners return at most 8 files). Usage: OUT=dir BUDGET_S=540 scripts/gpu_check.sh
# (SKIP_BUILD=1: use the extension as built, e.g. for a dry run of the script on a machine without a GPU.)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-540}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
S="$OUT/summary.txt"
: > "$S"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# step NAME SECONDS LOG CMD...: run CMD with min(SECONDS, time left - reserve) as its limit
step() {
  local name=$1 want=$2 log=$3; shift 3
  local lim; lim=$(left); lim=$(( lim - 10 )); [ "$want" -lt "$lim" ] && lim=$want
  if [ "$lim" -lt 15 ]; then echo "$name: skipped (no time left)" >> "$S"; return 1; fi
  local t0; t0=$(date +%s)
  timeout -k 5 "$lim" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $lim s)" >> "$S"
  return $rc
}
pack() {
  [ -f "$OUT/bench.log" ] && mkdir -p "$OUT/bench" && mv "$OUT/bench.log" "$OUT/bench/"
  [ -d "$OUT/bench" ] && tar -czf "$OUT/bench.tar.gz" -C "$OUT" bench && rm -rf "$OUT/bench"
}
trap pack EXIT

{
  nvidia-smi -L; nproc; free -g | head -2
  command -v nvcc && nvcc --version | tail -2
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); export CUDA_HOME; fi
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Built with the image's /opt/gcc/bin/g++, every C++ exception of _C was a SIGSEGV (libstdc++
# apparently linked statically, see scripts/gpu_probe.py): use the system compiler where there is one.
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
export WITH_CUDA=1
if [ -n "${SKIP_BUILD:-}" ]; then
  echo "build: skipped (SKIP_BUILD)" >> "$S"
elif ! step build-cuda 300 "$OUT/build.log" $PY setup.py -q build_ext --inplace; then
  # Without the CUDA kernels the Triton backends still run on the GPU: build the CPU part and go on.
  export WITH_CUDA=0
  step build-cpu-only 150 "$OUT/build_cpu.log" $PY setup.py -q build_ext --inplace
  cat "$OUT/build_cpu.log" >> "$OUT/build.log"; rm -f "$OUT/build_cpu.log"
fi
$PY -c "import lpqld_fast, torch; from lpqld_fast.ops import available_backends as a; \
print('backends on cuda:', a('cuda'), a('cuda', 'soft_label_kl_fwd'), a('cuda', 'segment_bn_loss_fwd'))" >> "$S" 2>&1

# pytest-xdist where installed (the CUDA image has it): -n N workers share the GPU
N8=""; N12=""
if $PY -c "import xdist" 2>/dev/null; then N8="-n 8"; N12="-n 12"; fi
OP_TESTS="tests/test_soft_label_kl.py tests/test_segment_bn_loss.py tests/test_classwise_moments.py \
tests/test_crop_resize_flip.py tests/test_bn_eval_segment_loss.py tests/test_recover.py"
# The GPU tests first (cuda / triton backends against the references, recover on the GPU), then the benchmarks,
# then the op test files whole and the whole suite with whatever time is left.
# shellcheck disable=SC2086
step tests-gpu 150 "$OUT/tests_gpu.log" $PY -m pytest -q -p no:cacheprovider $N8 -k "cuda or gpu" $OP_TESTS
step probe 120 "$OUT/probe.log" $PY scripts/gpu_probe.py "$OUT"
cat "$OUT/probe.log" >> "$OUT/probe.txt" 2>/dev/null; rm -f "$OUT/probe.log"
step bench-cuda 200 "$OUT/bench.log" $PY -m bench.run --devices cuda \
  --only "${BENCH_ONLY:-recover,soft_label_kl,segment_bn_loss,classwise_moments,crop_resize_flip,student_step}" --out "$OUT/bench"
# The stages' per-step functions eager vs torch.compile vs CUDA graphs (what <stage>.compile=auto is chosen from):
# rows in the bench folder (bench.tar.gz: stage_compile.csv, stage_compile.log).
mkdir -p "$OUT/bench"
step stage-compile 120 "$OUT/bench/stage_compile.log" $PY -m bench.stage_compile --device cuda \
  --out "$OUT/bench/stage_compile.csv"
# End to end on the GPU (a short Fashion-MNIST distill) when the data travelled along: here, once,
#   mkdir -p gpu_data && cp -r /usr/share/datasets/fashion-mnist gpu_data/ && echo /gpu_data/ >> .git/info/exclude
# and name gpu_data in what travels to the GPU machine (30 MB).
FMNIST_DIR=${FMNIST_DIR:-gpu_data/fashion-mnist}
if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  step e2e 180 "$OUT/e2e.log" $PY -m lpqld_fast.cli distill --preset fashion-mnist --device "${E2E_DEVICE:-cuda}" \
    --data-root "$FMNIST_DIR" --out "${E2E_OUT:-/tmp/lpqld_e2e}" --set squeeze.epochs=1 --set recover.iterations=200 \
    --set relabel.epochs=20 --set train.epochs=20
else
  echo "e2e: skipped (no $FMNIST_DIR)" >> "$S"
fi
# shellcheck disable=SC2086
step tests-ops 100 "$OUT/tests_ops.log" $PY -m pytest -q -p no:cacheprovider $N12 -m "not slow" $OP_TESTS
# shellcheck disable=SC2086
step tests-all 200 "$OUT/tests_all.log" $PY -m pytest -q -p no:cacheprovider $N12 -m "not slow" tests
tail -3 "$OUT"/tests_*.log >> "$S" 2>/dev/null
cat "$OUT/tests_ops.log" "$OUT/tests_all.log" > "$OUT/tests_rest.log" 2>/dev/null; rm -f "$OUT/tests_ops.log" "$OUT/tests_all.log"
echo "total $(( $(date +%s) - START )) s" >> "$S"
