#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine with no network (see ENVIRONMENT.md):
# check the build prerequisites, install the package (no deps, no build isolation), build the CUDA extension,
# then, quick sweeps first: the end-to-end suite (--quick), the whole test suite on the GPU (every test, no
# -x), the kernel benchmarks (--quick), the pytest-benchmark micro-benchmarks, and, while time is left, the
# full sweeps. Logs, JSON, the markdown summary and PNG plots go to $OUT.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh [--quick]
#
# Time: every step runs under `timeout` and the whole script stops starting steps when its budget
# (PD_GPU_CHECK_SECONDS, default 570 s: one 10-minute device call) is spent; a benchmark cut short still
# leaves the rows it wrote ("complete": false in its JSON). --quick skips the full sweeps. Set a larger
# budget (e.g. PD_GPU_CHECK_SECONDS=3000) on a machine you hold longer. Exit status: 0 when every step that
# ran passed, 1 when one failed or timed out, 2 when a prerequisite is missing.
# Copy the JSON you trust into benchmarks/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${PD_GPU_CHECK_SECONDS:-570}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
QUICK=${1:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PD_KERNELS_COMMIT=${PD_KERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PD_KERNELS_BUILD_JOBS=${PD_KERNELS_BUILD_JOBS:-16}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() { echo "== $* ($(date +%T), $(left) s left)"; }
# run_step NAME MAX_SECONDS CMD...: run CMD under timeout min(MAX, time left), log to $OUT/NAME.log
run_step() {
  local name=$1 max=$2; shift 2
  local t; t=$(left)
  [ "$max" -lt "$t" ] && t=$max
  if [ "$t" -lt 20 ]; then echo "== skip $name: time budget spent"; return 0; fi
  step "$name (up to ${t} s)"
  timeout --signal=INT --kill-after=15 "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!! $name: timed out after ${t} s"; status=1
  elif [ $rc -ne 0 ]; then echo "!! $name: exit $rc"; status=1; fi
  return 0
}

step "prerequisites"
missing=()
command -v nvidia-smi >/dev/null || missing+=("nvidia-smi (no NVIDIA driver?)")
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || missing+=("torch with a visible CUDA GPU ($PY -c 'import torch; print(torch.cuda.is_available())')")
for mod in triton transformers numpy pytest pybind11; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("python module $mod")
done
{ command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null; } \
  || missing+=("ninja (the CUDA extension is built with it; pip install ninja, or carry a wheel in)")
[ -x "$CUDA_HOME/bin/nvcc" ] || missing+=("nvcc at \$CUDA_HOME/bin/nvcc (CUDA_HOME=$CUDA_HOME)")
if [ ${#missing[@]} -gt 0 ]; then
  printf 'gpu_check: missing prerequisite: %s\n' "${missing[@]}"
  echo "gpu_check: install --no-deps needs everything above already present; nothing was run."
  exit 2
fi
for mod in pytest_benchmark pynvml matplotlib; do
  "$PY" -c "import $mod" 2>/dev/null || echo "gpu_check: optional module $mod missing (its part is skipped)"
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
  | tee "$OUT/gpu.txt"

step install
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }

run_step build_cuda 300 $PY -c "import pd_kernels._cuda_ext as e; p = e.load_problem(); print('cuda extension:', p or 'ok'); raise SystemExit(1 if p else 0)"

# quick sweeps first: the end-to-end suite is the first result
run_step bench_decoder_quick 270 $PY benchmarks/bench_decoder.py --quick --out "$OUT/bench_decoder_quick.json" \
  --report "$OUT/decoder_quick"

TAIL=40 run_step tests 300 $PY -m pytest -q tests -p no:cacheprovider -ra

for b in kv_cache attention unmask commit overhead; do
  [ -f "benchmarks/bench_$b.py" ] || continue
  extra=""
  $PY benchmarks/bench_$b.py --help 2>/dev/null | grep -q -- "--quick" && extra="--quick"
  run_step "bench_${b}_quick" 120 $PY benchmarks/bench_$b.py $extra --out "$OUT/bench_${b}_quick.json"
done
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  run_step pytest_benchmark 120 $PY -m pytest benchmarks/ --benchmark-only --bench-quick -q -p no:cacheprovider \
    --benchmark-json "$OUT/pytest_benchmark.json"
fi

if [ "$QUICK" != "--quick" ]; then
  run_step bench_decoder 1800 $PY benchmarks/bench_decoder.py --out "$OUT/bench_decoder.json" --report "$OUT/decoder"
  for b in kv_cache attention unmask commit; do
    [ -f "benchmarks/bench_$b.py" ] || continue
    run_step "bench_$b" 600 $PY benchmarks/bench_$b.py --out "$OUT/bench_$b.json"
  done
fi
step "done (status $status, $(( $(date +%s) - START )) s)"
exit $status
