#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu (no GPU needed): each file is
# compiled to an object in a temp dir with the flags the extension build
# uses (sm_90, C++20, torch include dirs, the nvidia wheel headers, torch's
# defines). Fails loudly on any error; prints "skipped: no nvcc" and exits 0
# when there is no nvcc. A file that compiled with the same content, headers,
# flags and nvcc is not compiled again (stamps in build/cuda_check; set
# CUDA_CHECK_NO_CACHE=1 to recompile everything).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC="$CUDA_HOME/bin/nvcc"
if [ ! -x "$NVCC" ]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=$(command -v nvcc); else echo "skipped: no nvcc"; exit 0; fi
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then echo "cuda-check: no csrc/cuda/*.cu"; exit 0; fi

# Flags from torch: include dirs, nvcc defines, C++ ABI; plus the nvidia/*/include
# dirs of the pip wheels (the local toolkit lacks some headers torch pulls in).
mapfile -t flags < <(CUDA_HOME="$CUDA_HOME" "$PY" - 2>/dev/null <<'PYEOF'
import glob, os, sysconfig
import torch
from torch.utils import cpp_extension as ce
out = []
for d in ce.include_paths():
    out += ["-I", d]
try:
    import nvidia
    for base in nvidia.__path__:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            out += ["-I", inc]
except ImportError:
    pass
out += ["-I", sysconfig.get_paths()["include"]]
out += list(ce.COMMON_NVCC_FLAGS)
out += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
print("\n".join(out))
PYEOF
)
if [ ${#flags[@]} -eq 0 ]; then echo "cuda-check: could not get the torch flags from $PY" >&2; exit 1; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cache=build/cuda_check
mkdir -p "$cache"
nvcc_version=$("$NVCC" --version | tail -1)
common_flags=(-std=c++20 -O0 -Xcompiler -fPIC -gencode arch=compute_90,code=sm_90 -DWITH_CUDA
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -I csrc "${flags[@]}")
# Local headers a .cu may include.
headers_hash=$(find csrc -type f \( -name '*.h' -o -name '*.cuh' -o -name '*.hpp' \) -print0 | sort -z \
  | xargs -0 -r cat | sha256sum | cut -d' ' -f1)
jobs=${MAX_JOBS:-2}
fail=0
compiled=0
cached=0
pids=()
names=()
stamps=()
finish() {  # wait for the oldest job
  local log="$tmp/$(basename "${names[0]%.cu}").log"
  if wait "${pids[0]}"; then
    touch "${stamps[0]}"
  else
    fail=1
    echo "cuda-check: FAILED ${names[0]}" >&2
    cat "$log" >&2
  fi
  pids=("${pids[@]:1}"); names=("${names[@]:1}"); stamps=("${stamps[@]:1}")
}
for src in "${sources[@]}"; do
  key=$( { cat "$src"; echo "$headers_hash $nvcc_version ${common_flags[*]}"; } | sha256sum | cut -d' ' -f1)
  stamp="$cache/$(basename "${src%.cu}").$key.ok"
  if [ -z "${CUDA_CHECK_NO_CACHE:-}" ] && [ -e "$stamp" ]; then cached=$((cached + 1)); continue; fi
  rm -f "$cache/$(basename "${src%.cu}")".*.ok
  "$NVCC" -c "$src" -o "$tmp/$(basename "${src%.cu}").o" "${common_flags[@]}" >"$tmp/$(basename "${src%.cu}").log" 2>&1 &
  pids+=($!); names+=("$src"); stamps+=("$stamp")
  compiled=$((compiled + 1))
  if [ ${#pids[@]} -ge "$jobs" ]; then finish; fi
done
while [ ${#pids[@]} -gt 0 ]; do finish; done
if [ "$fail" -ne 0 ]; then echo "cuda-check: compilation errors (see above)" >&2; exit 1; fi
echo "cuda-check: ${#sources[@]} file(s) OK ($compiled compiled, $cached unchanged) with $nvcc_version"
