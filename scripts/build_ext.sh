#!/usr/bin/env bash
# Build lpqld_fast._C in place (editable install). Serialised with flock so
# concurrent builds in one checkout do not clobber build/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec 9>/tmp/lpqld-build.lock
flock 9
# Without a GPU the CUDA kernels cannot run: build CPU-only by default (`make cuda-check`
# proves the CUDA sources compile). WITH_CUDA=1 forces the CUDA build.
if [ -z "${WITH_CUDA:-}" ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export WITH_CUDA=1
  else
    export WITH_CUDA=0
  fi
fi
if [ "$WITH_CUDA" = 1 ] && [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
# Build into build/lib, then move the library into the package by rename: `--inplace` would truncate and
# rewrite lpqld_fast/_C*.so, under any running job that has it mapped (a crash); a rename leaves those jobs
# their old file.
"$PY" setup.py -q build_ext --build-lib build/lib "$@"
for so in build/lib/lpqld_fast/_C*.so; do
  dst="lpqld_fast/$(basename "$so")"
  if ! cmp -s "$so" "$dst"; then
    cp "$so" "$dst.tmp.$$"
    mv -f "$dst.tmp.$$" "$dst"
  fi
done
