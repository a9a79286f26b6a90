#!/usr/bin/env bash
# Runs every libFuzzer target of a KASMINA_FUZZ=ON build for a bounded time each.
#   tests/fuzz/run.sh BUILD_DIR [SECONDS_PER_TARGET] [TARGET...]
# Seeds: tests/fuzz/corpus/<target>, tests/fuzz/regressions/<target> (and, for safetensors, the
# reader's test corpus tests/unit/data/safetensors); new inputs go to BUILD_DIR/fuzz-work/<target>
# (never into the source tree). A crash, leak, timeout or sanitizer report fails the run and
# leaves the input in BUILD_DIR/fuzz-work/<target>-artifacts/: fix the bug, then commit the input
# under tests/fuzz/regressions/<target>/ (replayed by ctest, label unit).
# Env: KASMINA_FUZZ_SEED (default 1: the same mutation sequence every run).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:?usage: run.sh BUILD_DIR [SECONDS] [TARGET...]}
SECS=${2:-25}
shift $(( $# >= 2 ? 2 : 1 ))
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(rpc safetensors config)
SEED=${KASMINA_FUZZ_SEED:-1}

export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

fail=0
for t in "${TARGETS[@]}"; do
  bin="$BUILD/tests/fuzz/fuzz_$t"
  work="$BUILD/fuzz-work/$t"
  arts="$BUILD/fuzz-work/$t-artifacts"
  rm -rf "$work" "$arts"   # a fresh run each time: with a fixed seed, CI explores the same way
  mkdir -p "$work" "$arts"
  seeds=(tests/fuzz/corpus/"$t")
  [ -d tests/fuzz/regressions/"$t" ] && seeds+=(tests/fuzz/regressions/"$t")
  [ "$t" = safetensors ] && seeds+=(tests/unit/data/safetensors)
  # rpc and safetensors keep models alive across inputs, so libFuzzer's per-input leak check
  # (a full LeakSanitizer scan after every input that allocated more than it freed) would cost
  # ~90% of their time: they are checked for leaks once, at exit, instead.
  leaks=1
  [ "$t" = config ] || leaks=0
  log="$BUILD/fuzz-work/$t.log"
  echo "fuzz: $t for ${SECS}s (seed $SEED)"
  set +e
  "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -seed="$SEED" -detect_leaks=$leaks -close_fd_mask=3 -print_final_stats=1 -artifact_prefix="$arts/" \
    "$work" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  if [ "$rc" -ne 0 ]; then
    echo "fuzz: $t FAILED (exit $rc) after ${execs:-?} executions; the input is in $arts:" >&2
    ls "$arts" >&2 || true
    grep -E "ERROR|SUMMARY|runtime error|fuzz_[a-z]+: " "$log" | head -20 >&2 || true
    echo "fuzz: full log: $log" >&2
    fail=1
  else
    echo "fuzz: $t ok: ${execs:-?} executions, ${cov:-cov: ?}, corpus $(ls "$work" | wc -l) new inputs"
  fi
done
exit $fail
