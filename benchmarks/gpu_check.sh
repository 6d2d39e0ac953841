#!/usr/bin/env bash
# The GPU check of a short lent session, in two prepared commands (docs/ARCHITECTURE.md, "A GPU session").
#
# A session has 15 minutes of device time in all: the machine's start (1-2 min), each command (10 min at most),
# idle time; at most 8 files come back from $OUT; the machine has no network and its copy of the tree no .git.
# So the check is one FIRST command (budget 420 s) and one SECOND (budget 180 s) for what the first cannot fit:
#
#   bash benchmarks/gpu_check.sh --stamp            # here, where git is: write benchmarks/COMMIT (carried along)
#   bash benchmarks/gpu_check.sh                    # on the GPU machine: the first command  (timeout_s 480)
#   bash benchmarks/gpu_check.sh --second           # on the GPU machine: the second command (timeout_s 240)
#   bash benchmarks/gpu_check.sh --only bench_attn,sanitizer   # rerun some phases (each up to 2x its estimate)
#   bash benchmarks/gpu_check.sh --plan [--second]  # any machine: phases, deadlines, files; checks that it fits
#   bash benchmarks/gpu_check.sh --dry-run [--second]   # a CPU machine: every phase at tiny sizes (interpreter)
#
# Every phase has a deadline (seconds from the start): it runs under `timeout` until then, a phase whose time is
# gone is skipped, and after each phase the results are packed into $OUT (3 files: summary.md, results.tar.gz
# with every log / JSON / report, gpu_check.log the console), so a command cut short keeps what finished.
# Timings next to each phase are estimates for an H100 (16 cores), not measurements. Exit status: 0 when every
# phase that ran passed, 1 when one failed or timed out, 2 when a prerequisite is missing.
#
# Environment: OUT (default ./gpu_out), PYTHON (default python3), PD_GPU_CHECK_WORKERS (pytest-xdist
# processes, default 14: the CUDA build takes the other cores meanwhile), PD_GPU_CHECK_SCALE (deadline
# multiplier; default 1, 6 with --dry-run), PD_KERNELS_COMMIT (the commit, when not stamped).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# ---- the file table: every test and benchmark file the check runs, looked up here only -------------------
FILE_TABLE="
kernels     tests/test_paged_kv_write.py
kernels     tests/test_token_confidence.py
kernels     tests/test_commit_spans.py
kernels     tests/test_span_attention.py
rest        tests/test_graph_capture.py
rest        tests/test_compile_attention.py
rest        tests/test_dispatch.py
rest        tests/test_backend.py
rest        tests/test_decoder.py
rest        tests/test_decoder_static.py
rest        tests/test_decoder_invariance.py
rest        tests/test_decoder_stream.py
rest        tests/test_integration_transformers.py
bench_tc    benchmarks/bench_token_confidence.py
bench_kv    benchmarks/bench_paged_kv_write.py
bench_attn  benchmarks/bench_span_attention.py
bench_dec   benchmarks/bench_decoder.py
micro       benchmarks/test_kernels.py
driver      benchmarks/sanitizer_driver.py
"

# need GROUP: the group's files, or a message and failure when it has none (pytest would run everything)
need() {
  local fl; fl=$(files "$1")
  [ -n "$fl" ] || { echo "gpu_check: no file of group $1 exists (see the file table)" >&2; return 1; }
  echo "$fl"
}

# files GROUP: the group's files (a missing one is left out, and named on stderr)
files() {
  local g f out=()
  while read -r g f; do
    [ "$g" = "$1" ] || continue
    if [ -f "$f" ]; then out+=("$f"); else echo "gpu_check: $f (group $g) is missing" >&2; fi
  done <<< "$FILE_TABLE"
  echo "${out[*]:-}"
}

# ---- the phases: name, deadline (s from the start), estimate on an H100 (s), what --------------------------
# First command, budget 420 s. The CUDA extension (2 .cu + 3 .cpp against torch's headers, 16 jobs) builds in
# the background from the setup on (estimate 60-90 s) while the Triton tests run; only the cuda tests wait for it.
FIRST_BUDGET=420
FIRST_PHASES="
setup          20   12  prerequisites, GPU facts, commit; starts the CUDA extension build in the background
tests_kernels  130  100 kernel tests on the GPU, Triton and torch backends, pytest-xdist (about 120 Triton JIT compiles of 1-4 s spread over the workers)
tests_cuda     165  25  kernel tests of the cuda backend, once the build is done
bench_tc       195  25  token_confidence + commit_spans at N 32 and 256, V 152064 bf16: reference, triton, cuda
bench_kv       230  30  paged KV write, 7 token counts x 1 and 28 layers: torch, triton, cuda, copy ceiling
bench_attn     305  70  span attention, 4 points (PD and PD-DA rounds, decode, prefill): triton, compiled flex (a compile each), SDPA
bench_dec      375  65  decoder, Dream-7B shape bf16, 2 requests, batch 1: AR and PD with CUDA graphs, the reference-style loop
sanitizer      410  35  compute-sanitizer memcheck over benchmarks/sanitizer_driver.py (every kernel, every backend)
"
# Second command, budget 180 s: the rest of the GPU tests, the other sanitizer tools, the micro-benchmarks.
SECOND_BUDGET=180
SECOND_PHASES="
setup          20   12  as in the first command (the extension build is a no-op on the same machine)
tests_rest     110  90  decoder, CUDA graphs, compiled attention, dispatch and model-integration tests, pytest-xdist
racecheck      140  25  compute-sanitizer racecheck: the commit and row kernels (shared memory)
initcheck      160  15  compute-sanitizer initcheck: attention (split-K workspace) and the KV write
micro          175  12  pytest-benchmark micro-benchmarks (--bench-quick)
"
OUT_FILES="summary.md results.tar.gz gpu_check.log"
PYTEST_K_CUDA="cuda"
ATTN_CASES='^(pd|pd-da) B8 S8x80 P2048$|^decode B8 ctx4096$|^prefill B1 n2048$'

# ---- arguments ---------------------------------------------------------------------------------------------
MODE=run; CMD=first; ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) MODE=plan ;;
    --dry-run) MODE=dry ;;
    --stamp) MODE=stamp ;;
    --second) CMD=second ;;
    --only) ONLY=${2:?--only needs phase names}; CMD=only; shift ;;
    --quick) ;;   # accepted for old command lines: the first command is the quick one
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)"; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
for n in ${ONLY//,/ }; do
  printf '%s\n%s\n' "$FIRST_PHASES" "$SECOND_PHASES" | awk -v n="$n" '$1 == n { f = 1 } END { exit !f }' \
    || { echo "gpu_check: --only: unknown phase $n"; exit 2; }
done

if [ "$MODE" = stamp ]; then
  exec "$PY" benchmarks/provenance.py stamp
fi

phase_table() {   # the phase table of the command
  case "$CMD" in
    first) echo "$FIRST_PHASES" ;;
    second) echo "$SECOND_PHASES" ;;
    only)   # setup, then the named phases of either command, each up to twice its estimate
      local t=20 n d e w
      echo "setup 20 12 as in the first command"
      for n in ${ONLY//,/ }; do
        read -r _ d e w <<< "$(printf '%s\n%s\n' "$FIRST_PHASES" "$SECOND_PHASES" | awk -v n="$n" '$1 == n' | head -1)"
        t=$(( t + 2 * e )); echo "$n $t $e $w"
      done ;;
  esac
}
budget() {
  case "$CMD" in first) echo $FIRST_BUDGET ;; second) echo $SECOND_BUDGET ;;
    only) phase_table | awk 'NF { b = $2 } END { print b + 5 }' ;; esac
}

phase_files() {   # the repository files a phase uses (shown by --plan, checked to exist)
  case "$1" in
    setup) echo "pd_kernels/_cuda_ext.py benchmarks/provenance.py" ;;
    tests_kernels|tests_cuda) files kernels ;;
    tests_rest) files rest ;;
    bench_tc|bench_kv|bench_attn|bench_dec) files "$1" ;;
    sanitizer|racecheck|initcheck) files driver ;;
    micro) files micro ;;
  esac
}

# ---- --plan ------------------------------------------------------------------------------------------------
if [ "$MODE" = plan ]; then
  B=$(budget); ok=1; prev=0; sum=0; n=0
  echo "gpu_check plan: the $CMD command, budget $B s (the machine's start, 1-2 min, comes before it)"
  printf '  %-14s %8s %9s  %s\n' phase deadline estimate "files (what)"
  while read -r name dl est what; do
    [ -n "$name" ] || continue
    n=$((n + 1)); sum=$((sum + est))
    fl=$(phase_files "$name")
    printf '  %-14s %7ss %8ss  %s\n' "$name" "$dl" "$est" "${fl:-(none)}"
    printf '  %-14s %18s  (%s)\n' "" "" "$what"
    [ -n "$fl" ] || { echo "  !! $name: none of its files exists"; ok=0; }
    for f in $fl; do [ -f "$f" ] || { echo "  !! $name: missing $f"; ok=0; }; done
    [ "$dl" -gt "$prev" ] || { echo "  !! $name: deadline $dl s not after the previous one ($prev s)"; ok=0; }
    [ $((dl - prev)) -ge "$est" ] || { echo "  !! $name: estimate $est s exceeds its window $((dl - prev)) s"; ok=0; }
    prev=$dl
  done <<< "$(phase_table)"
  nf=$(echo $OUT_FILES | wc -w)
  [ "$prev" -le "$B" ] || { echo "  !! the last deadline ($prev s) is past the budget ($B s)"; ok=0; }
  [ "$nf" -le 8 ] || { echo "  !! $nf files in \$OUT: at most 8 come back"; ok=0; }
  echo "  after every phase: pack into \$OUT: $OUT_FILES"
  echo "  estimates sum to $sum s of $B s; the last deadline leaves $((B - prev)) s to pack"
  case "$CMD" in
    first) echo "  device call: run(command=\"bash benchmarks/gpu_check.sh\", timeout_s=480, carry=[\"benchmarks/COMMIT\"])" ;;
    second) echo "  device call: run(command=\"bash benchmarks/gpu_check.sh --second\", timeout_s=240, carry=[\"benchmarks/COMMIT\"])" ;;
  esac
  echo "plan: $n phases, budget $B s, $nf files"
  [ $ok = 1 ] || { echo "gpu_check: the plan does not hold"; exit 1; }
  exit 0
fi

# ---- running: the work directory, the clock, packing -------------------------------------------------------
DRY=0; [ "$MODE" = dry ] && DRY=1
SCALE=${PD_GPU_CHECK_SCALE:-$([ $DRY = 1 ] && echo 6 || echo 1)}
BUDGET=$(( $(budget) * SCALE ))
OUT=${OUT:-$ROOT/gpu_out}
WORK=${PD_GPU_CHECK_WORK:-${TMPDIR:-/tmp}/pd_gpu_check.$CMD}
rm -rf "$WORK"; mkdir -p "$WORK/logs" "$WORK/results" "$OUT"
rm -f "$OUT/summary.md" "$OUT/results.tar.gz" "$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
now() { echo $(( $(date +%s) - START )); }
status=0
PHASE_DEADLINE=0
: > "$WORK/phases.tsv"

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PD_KERNELS_BUILD_JOBS=${PD_KERNELS_BUILD_JOBS:-16}
# caches inside the checkout (git-ignored): kept between the calls of one warm machine
export PD_KERNELS_CACHE_DIR=${PD_KERNELS_CACHE_DIR:-$ROOT/.gpu_cache/torch_ext}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/.gpu_cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.gpu_cache/inductor}
WORKERS=${PD_GPU_CHECK_WORKERS:-14}

# tmo CMD...: run CMD until the phase's deadline (SIGINT first: pytest and the benchmarks keep what they have)
tmo() {
  local t=$(( PHASE_DEADLINE - $(now) ))
  if [ "$t" -lt 5 ]; then echo "(no time left in this phase for: $*)"; return 124; fi
  timeout --signal=INT --kill-after=15 "$t" "$@"
}

pack() {
  write_summary
  local f
  for f in "$WORK"/logs/*.log; do   # a runaway log must not crowd out the rest (16 MiB a file comes back)
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 4194304 ] && { tail -c 4194304 "$f" > "$f.t"; mv "$f.t" "$f"; }
  done
  cp "$OUT/summary.md" "$WORK/summary.md" 2>/dev/null
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

write_summary() {
  local s="$OUT/summary.md.tmp"
  {
    echo "# pd_kernels GPU check: $CMD command$([ $DRY = 1 ] && echo ' (DRY RUN on CPU: tiny sizes, not results)')"
    echo
    echo "- commit: \`${PD_KERNELS_COMMIT:-unknown}\`"
    echo "- started: $(date -u -d "@$START" +%FT%TZ), elapsed $(now) s of $BUDGET s"
    [ -s "$WORK/gpu.txt" ] && echo "- GPU: $(tail -n +2 "$WORK/gpu.txt" | head -1)"
    [ -s "$WORK/versions.txt" ] && echo "- $(cat "$WORK/versions.txt")"
    echo
    echo "| phase | deadline s | estimate s | took s | result |"
    echo "|---|---|---|---|---|"
    local name dl est what
    while read -r name dl est what; do
      [ -n "$name" ] || continue
      local row; row=$(awk -F'\t' -v n="$name" '$1 == n' "$WORK/phases.tsv" | tail -1)
      if [ -n "$row" ]; then
        echo "| $name | $(( dl * SCALE )) | $est | $(cut -f2 <<< "$row") | $(cut -f3 <<< "$row") |"
      else
        echo "| $name | $(( dl * SCALE )) | $est | - | not reached |"
      fi
    done <<< "$(phase_table)"
    echo
    for f in $(phase_table | awk 'NF { print $1 }' | sed 's/^setup$/setup build_cuda/'); do
      f="$WORK/logs/$f.log"
      [ -f "$f" ] || continue
      echo "## $(basename "$f" .log)"
      echo '```'
      highlights "$f"
      echo '```'
    done
    echo
    echo "Everything (logs, JSON, reports, junit XML) is in results.tar.gz; the console in gpu_check.log."
  } > "$s"
  mv "$s" "$OUT/summary.md"
}

# the lines of a log worth reading first: pytest's outcome and failures, tables, sanitizer verdicts, errors
highlights() {
  case "$(basename "$1")" in
    tests_*|micro*)
      local done_re="^=+ .*(passed|failed|error|no tests ran).* =+$|^[0-9]+ (passed|failed|skipped|deselected|error)|^no tests ran"
      grep -E "^(FAILED|ERROR) |$done_re|Interrupted|^\(" "$1" | tail -40
      grep -qE "$done_re" "$1" \
        || echo "(no pytest summary: cut at the deadline; per-test lines seen: $(grep -cE " PASSED" "$1") passed, $(grep -cE " (FAILED|ERROR)" "$1") failed or errors)" ;;
    sanitizer*|racecheck*|initcheck*) grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^FAIL|========= (Invalid|Uninitialized|Race|Error)|sanitizer driver:" "$1" | head -40 ;;
    build*) tail -5 "$1" ;;
    *) tail -32 "$1" ;;
  esac
}

# run_phase NAME DEADLINE FUNCTION: the phase's function under its deadline, logged, recorded, then packed
run_phase() {
  local name=$1 dl=$(( $2 * SCALE )) t0 rc res
  PHASE_DEADLINE=$dl
  if [ $(( dl - $(now) )) -lt 10 ]; then
    echo "== $name: skipped, its deadline ($dl s) is reached ($(now) s)"
    printf '%s\t-\tskipped: deadline reached\n' "$name" >> "$WORK/phases.tsv"; status=1; pack; return
  fi
  echo "== $name ($(date +%T), $(now) s elapsed, until $dl s)"
  t0=$(now)
  "phase_$name" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-15}" "$WORK/logs/$name.log"
  case $rc in
    0) res=ok ;;
    124|137|130) res="TIMEOUT (deadline $dl s)"; status=1 ;;
    *) res="FAILED (exit $rc)"; status=1 ;;
  esac
  echo "== $name: $res in $(( $(now) - t0 )) s"
  printf '%s\t%s\t%s\n' "$name" "$(( $(now) - t0 ))" "$res" >> "$WORK/phases.tsv"
  pack
}

# ---- the phases --------------------------------------------------------------------------------------------
pytest_args() {   # common pytest options; xdist on a GPU machine, a sample of each file in a dry run
  local n=$1
  echo "-v -ra -p no:cacheprovider"   # -v: a line per test, so a phase cut at its deadline still says what ran
  if [ $DRY = 1 ]; then echo "-x -p benchmarks._pytest_sample --sample-per-file 1"
  elif "$PY" -c "import xdist" 2>/dev/null && [ "$n" -gt 1 ]; then echo "-n $n --dist load"; fi
}

phase_setup() {
  local missing=()
  if [ $DRY = 0 ]; then
    command -v nvidia-smi >/dev/null || missing+=("nvidia-smi (no NVIDIA driver?)")
    [ -x "$CUDA_HOME/bin/nvcc" ] || missing+=("nvcc at \$CUDA_HOME/bin/nvcc (CUDA_HOME=$CUDA_HOME)")
    { command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null; } || missing+=("ninja (builds the extension)")
    command -v compute-sanitizer >/dev/null || [ -x "$CUDA_HOME/bin/compute-sanitizer" ] \
      || echo "gpu_check: compute-sanitizer not found (the sanitizer phases run the driver alone)"
  fi
  # one interpreter for every module check and the versions (each start of python + torch costs seconds)
  tmo "$PY" - "$DRY" > "$WORK/python_check.txt" 2>&1 <<'PYCHECK'
import importlib, sys
need, want = ("torch", "triton", "transformers", "numpy", "pytest"), ("xdist", "pytest_benchmark", "pynvml", "matplotlib")
mods = {}
for m in need + want:
    try:
        mods[m] = importlib.import_module(m)
    except Exception as e:
        print(("missing: " if m in need else "optional missing: ") + f"{m} ({type(e).__name__})")
if "torch" in mods and sys.argv[1] == "0" and not mods["torch"].cuda.is_available():
    print("missing: torch with a visible CUDA GPU")
v = lambda m: getattr(mods.get(m), "__version__", "-")
print(f"versions: python {sys.version.split()[0]}, torch {v('torch')}, triton {v('triton')}, transformers {v('transformers')}")
PYCHECK
  local rc=$?
  cat "$WORK/python_check.txt"
  case $rc in 0) ;;
    124|137) echo "gpu_check: WARNING: the python check did not finish by the setup's deadline (a cold disk?): going on" ;;
    *) echo "gpu_check: the python check failed (exit $rc)"; return $rc ;;
  esac
  while read -r line; do missing+=("python module ${line#missing: }"); done < <(grep '^missing: ' "$WORK/python_check.txt")
  if [ ${#missing[@]} -gt 0 ]; then printf 'gpu_check: missing prerequisite: %s\n' "${missing[@]}"; return 2; fi
  grep '^versions: ' "$WORK/python_check.txt" | cut -c11- > "$WORK/versions.txt"
  echo "commit: $PD_KERNELS_COMMIT"
  if [ $DRY = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.draw,temperature.gpu \
      --format=csv | tee "$WORK/gpu.txt"
  fi
  # the CUDA extension, in the background (the Triton tests do not need it); cuda phases wait for build.rc
  (
    if [ $DRY = 1 ]; then   # no CUDA torch here: show what the build would compile, with which flags
      "$PY" -c "import pd_kernels._cuda_ext as c; print('would build', c.sources(), 'with', c.NVCC_FLAGS, c.arch_flags()); print('here:', c.load_problem())"
    else
      timeout 300 "$PY" -c "import pd_kernels._cuda_ext as e; p = e.load_problem(); print('cuda extension:', p or 'ok'); raise SystemExit(1 if p else 0)"
    fi > "$WORK/logs/build_cuda.log" 2>&1
    echo $? > "$WORK/build.rc"
  ) &
  echo "CUDA extension build started in the background (log: build_cuda.log)"
}

wait_build() {   # until the background build ends or the phase's deadline is 20 s away
  while [ ! -f "$WORK/build.rc" ] && [ $(( PHASE_DEADLINE - $(now) )) -gt 20 ]; do sleep 1; done
  if [ ! -f "$WORK/build.rc" ]; then echo "the CUDA extension build has not finished in time"; return 124; fi
  echo "CUDA extension build: exit $(cat "$WORK/build.rc") ($(tail -1 "$WORK/logs/build_cuda.log"))"
  [ $DRY = 1 ] || [ "$(cat "$WORK/build.rc")" = 0 ]
}

pytest_rc() {   # pytest's exit status; "no tests ran" (5) is a failure, except for a dry run's cuda selection
  local rc=$1
  if [ "$rc" = 5 ] && [ "${2:-}" = dry-ok ] && [ $DRY = 1 ]; then echo "(dry run: no cuda tests on a CPU)"; return 0; fi
  return "$rc"
}

phase_tests_kernels() {
  local fl; fl=$(need kernels) || return 1
  # shellcheck disable=SC2046
  OMP_NUM_THREADS=1 tmo "$PY" -m pytest $(pytest_args "$WORKERS") -k "not $PYTEST_K_CUDA" \
    --junitxml="$WORK/results/junit_tests_kernels.xml" $fl
}

phase_tests_cuda() {
  local fl; fl=$(need kernels) || return 1
  wait_build || return $?
  # shellcheck disable=SC2046
  OMP_NUM_THREADS=1 tmo "$PY" -m pytest $(pytest_args 8) -k "$PYTEST_K_CUDA" \
    --junitxml="$WORK/results/junit_tests_cuda.xml" $fl
  pytest_rc $? dry-ok
}

smoke() { [ $DRY = 1 ] && echo "--smoke"; }

phase_bench_tc() {
  local fl; fl=$(need bench_tc) || return 1
  # shellcheck disable=SC2046
  tmo "$PY" $fl --N 32,256 --impls reference,triton,cuda --reps 20 $(smoke) \
    --out "$WORK/results/bench_token_confidence.json"
}

phase_bench_kv() {
  local fl; fl=$(need bench_kv) || return 1
  # shellcheck disable=SC2046
  tmo "$PY" $fl --reps 20 $(smoke) --out "$WORK/results/bench_paged_kv_write.json"
}

phase_bench_attn() {
  local fl; fl=$(need bench_attn) || return 1
  # shellcheck disable=SC2046
  tmo "$PY" $fl --quick --cases "$ATTN_CASES" --reps 20 $(smoke) \
    --out "$WORK/results/bench_span_attention.json"
}

phase_bench_dec() {
  local fl; fl=$(need bench_dec) || return 1
  # shellcheck disable=SC2046
  tmo "$PY" $fl --quick --modes ar,pd --graphs on --peer-modes ar,pd --sweep off --requests 2 \
    --reps 1 $(smoke) --out "$WORK/results/bench_decoder.json" --report "$WORK/results/bench_decoder"
}

# sanitize TOOL DRIVER-ARGS...: the driver under compute-sanitizer (torch's caching allocator off, so every
# tensor is its own allocation and an access past it is caught); the driver alone where there is no sanitizer
sanitize() {
  local fl; fl=$(need driver) || return 1
  local tool=$1; shift
  local cs; cs=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [ $DRY = 1 ] || [ ! -x "$cs" ]; then
    echo "(no compute-sanitizer$([ $DRY = 1 ] && echo ': dry run'): the driver alone)"
    # shellcheck disable=SC2046
    tmo "$PY" $fl "$@"
    return
  fi
  # shellcheck disable=SC2046
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 tmo "$cs" --tool "$tool" --error-exitcode 9 --print-limit 30 \
    "$PY" $fl "$@"
}

phase_sanitizer() { sanitize memcheck; }
phase_racecheck() { wait_build || return $?; sanitize racecheck --cases commit_spans,token_confidence; }
phase_initcheck() { wait_build || return $?; sanitize initcheck --cases attention,kv_write; }

phase_tests_rest() {
  local fl; fl=$(need rest) || return 1
  # shellcheck disable=SC2046
  OMP_NUM_THREADS=1 tmo "$PY" -m pytest $(pytest_args "$WORKERS") \
    --junitxml="$WORK/results/junit_tests_rest.xml" $fl
}

phase_micro() {
  local fl; fl=$(need micro) || return 1
  "$PY" -c "import pytest_benchmark" 2>/dev/null || { echo "pytest-benchmark missing: skipped"; return 0; }
  # shellcheck disable=SC2046
  tmo "$PY" -m pytest $fl --benchmark-only --bench-quick -q -p no:cacheprovider \
    --benchmark-json "$WORK/results/pytest_benchmark.json"
}

# ---- go ----------------------------------------------------------------------------------------------------
export PD_KERNELS_COMMIT=${PD_KERNELS_COMMIT:-$("$PY" benchmarks/provenance.py 2>/dev/null || echo unknown)}
echo "gpu_check: $CMD command$([ $DRY = 1 ] && echo ', DRY RUN (CPU, tiny sizes)'), budget $BUDGET s, commit $PD_KERNELS_COMMIT, out $OUT"
case "$PD_KERNELS_COMMIT" in unknown|*-modified)
  echo "gpu_check: WARNING: commit '$PD_KERNELS_COMMIT': stamp with 'bash benchmarks/gpu_check.sh --stamp' before sending and carry benchmarks/COMMIT" ;;
esac
while read -r name dl _; do
  [ -n "$name" ] || continue
  run_phase "$name" "$dl"
  if [ "$name" = setup ] && ! grep -q $'^setup\t[0-9]*\tok$' "$WORK/phases.tsv"; then
    echo "gpu_check: setup failed; nothing else was run"; status=2; break
  fi
done <<< "$(phase_table)"
pack
echo "== done: status $status in $(now) s; \$OUT holds: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
