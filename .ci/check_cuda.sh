#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU:
#  - every csrc/*.cu with nvcc for sm_90a and the build's flags (_cuda_ext.NVCC_FLAGS), with ptxas -v:
#    registers, stack and spills of every kernel, SASS instructions per element of the row pass's main loop
#    (tests/_sass.py cuda-report); fails on a spill;
#  - every csrc/bindings/*.cpp with g++ -fsyntax-only against the installed torch headers (a CPU torch
#    build lacks one generated CMake header, c10/cuda/impl/cuda_cmake_macros.h: an empty stub stands in).
# Usage: .ci/check_cuda.sh [python]   (skips, with a message, when nvcc is absent)
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then echo "check_cuda: nvcc not found, CUDA compile-check skipped"; exit 0; fi
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include; [ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# the build's own flags (one home: pd_kernels/_cuda_ext.py), read without importing the package
FLAGS=$("$PY" -c "import ast, sys; t = ast.parse(open('pd_kernels/_cuda_ext.py').read())
print(' '.join(next(ast.literal_eval(n.value) for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'NVCC_FLAGS')))")
echo "nvcc flags: $FLAGS"
for f in csrc/*.cu; do
  echo "nvcc sm_90a: $f"
  o="$tmp/$(basename "$f").o"
  # shellcheck disable=SC2086
  "$NVCC" -c -std=c++17 $FLAGS -Icsrc -gencode=arch=compute_90a,code=sm_90a -Xptxas -v \
    "$f" -o "$o" 2> "$o.log" || { cat "$o.log"; exit 1; }
  "$PY" tests/_sass.py cuda-report "$o" "$o.log"
done
mkdir -p "$tmp/stub/c10/cuda/impl" && echo '#pragma once' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
TI=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
PYI=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in csrc/bindings/*.cpp; do
  echo "g++ syntax: $f"
  g++ -std=c++20 -fsyntax-only -Wall -Werror=return-type -I"$tmp/stub" $TI -I"$PYI" -I"$CUDA_INC" -Icsrc "$f"
done
echo "check_cuda: ok"
