#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine with no network (see ENVIRONMENT.md):
# install the package (no deps, no build isolation), build the CUDA extension, run the test suite on the
# GPU (GPU-only tests included), run every benchmark, and write logs + JSON under $OUT.
#
#   OUT=/tmp/out PD_KERNELS_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh [--quick]
#
# Copy the JSON you trust into benchmarks/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
QUICK=${1:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PD_KERNELS_COMMIT=${PD_KERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PD_KERNELS_BUILD_JOBS=${PD_KERNELS_BUILD_JOBS:-16}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() { echo "== $* ($(date +%T))"; }

step install
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"

step "build CUDA extension"
$PY -c "import pd_kernels._cuda_ext as e; p = e.load_problem(); print('cuda extension:', p or 'ok'); raise SystemExit(1 if p else 0)" \
  || status=1

step "tests (GPU)"
$PY -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for b in kv_cache attention unmask commit decoder; do
  [ -f "benchmarks/bench_$b.py" ] || continue
  step "bench $b"
  extra=""
  [ "$QUICK" = "--quick" ] && $PY benchmarks/bench_$b.py --help 2>/dev/null | grep -q -- "--quick" && extra="--quick"
  $PY benchmarks/bench_$b.py $extra --out "$OUT/bench_$b.json" 2>&1 | tail -60 || status=1
done
step "done (status $status)"
exit $status
