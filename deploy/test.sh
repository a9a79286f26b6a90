#!/usr/bin/env bash
# Installs what is needed, builds kasmina and runs every test suite:
#   1. build/       the normal build (with the CUDA plugin when nvcc is present), all ctest suites
#   2. build-asan/  CUDA off, AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer:
#                   the unit, engine, daemon and rpc suites (kasminad itself runs sanitized)
#   3. build-fuzz/  clang, libFuzzer + ASan + UBSan: each fuzz target for a bounded time
#   4. build-tsan/  CUDA off, ThreadSanitizer: the concurrency programs of tests/tsan, kasminad
#                   itself under 16 concurrent clients (tsan_daemon) included
# Usage: ./deploy/test.sh            (from anywhere)
# Env:   JOBS (default nproc), KASMINA_SKIP_ASAN=1 to skip step 2, KASMINA_SKIP_FUZZ=1 to skip
#        step 3, KASMINA_FUZZ_SECONDS (per target, default 25), KASMINA_SKIP_TSAN=1 to skip step 4.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}

./deploy/install-deps.sh

NVCC=""
if command -v nvcc >/dev/null 2>&1; then NVCC=$(command -v nvcc);
elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -n "$NVCC" ]; then
  CUDA_ARGS=(-DKASMINA_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" "-DCMAKE_CUDA_ARCHITECTURES=80;90")
  echo "test.sh: building the CUDA backend plugin with $NVCC (architectures 80;90)"
else
  CUDA_ARGS=(-DKASMINA_CUDA=OFF)
  echo "test.sh: nvcc not found: the CUDA backend plugin is not built on this machine"
fi

echo "== build (RelWithDebInfo) =="
cmake -S . -B build -DKASMINA_WERROR=ON "${CUDA_ARGS[@]}"
cmake --build build -j"$JOBS"
ln -sf build/compile_commands.json compile_commands.json   # for clangd and clang-tidy
if [ -n "$NVCC" ] && [ ! -f build/libkasmina_cuda.so ]; then
  echo "test.sh: the CUDA plugin was not built" >&2; exit 1
fi

echo "== tests =="
ctest --test-dir build --output-on-failure -j"$JOBS" --timeout 600

if [ "${KASMINA_SKIP_ASAN:-0}" != "1" ]; then
  echo "== unit suites under ASan+UBSan =="
  cmake -S . -B build-asan -DKASMINA_CUDA=OFF -DKASMINA_SANITIZE=address,undefined \
        -DKASMINA_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=Debug
  cmake --build build-asan -j"$JOBS"
  # Reports of every process (kasminad started by the rpc tests included: it must exit with no
  # leak) go to build-asan/sanitizer-logs/; any file there fails the run.
  logs="$PWD/build-asan/sanitizer-logs"
  rm -rf "$logs" && mkdir -p "$logs"
  rc=0
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:log_path="$logs/asan" \
  UBSAN_OPTIONS=print_stacktrace=1:log_path="$logs/ubsan" \
  LSAN_OPTIONS=suppressions="$PWD/tests/lsan.supp":print_suppressions=0 \
    ctest --test-dir build-asan --output-on-failure -j"$JOBS" -L 'unit|engine|daemon|rpc' \
          --timeout 900 || rc=$?
  if compgen -G "$logs/*" >/dev/null; then
    echo "test.sh: sanitizer reports under ASan+UBSan:" >&2
    head -n 60 "$logs"/* >&2
    rc=1
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
fi
if [ "${KASMINA_SKIP_FUZZ:-0}" != "1" ]; then
  echo "== fuzz targets under ASan+UBSan (libFuzzer, tests/fuzz) =="
  if command -v clang >/dev/null 2>&1; then
    cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DKASMINA_CUDA=OFF -DKASMINA_FUZZ=ON \
          -DKASMINA_SANITIZE=address,undefined -DKASMINA_BUILD_TESTS=OFF -DKASMINA_BUILD_BENCH=OFF
    cmake --build build-fuzz -j"$JOBS" --target fuzz_rpc fuzz_safetensors fuzz_config
    ./tests/fuzz/run.sh build-fuzz "${KASMINA_FUZZ_SECONDS:-25}"
  else
    echo "test.sh: clang not found: the fuzz targets are skipped (deploy/install-deps.sh installs it)"
  fi
fi
if [ "${KASMINA_SKIP_TSAN:-0}" != "1" ]; then
  echo "== concurrency tests under ThreadSanitizer (tests/tsan) =="
  cmake -S . -B build-tsan -DKASMINA_CUDA=OFF -DKASMINA_SANITIZE=thread -DKASMINA_BUILD_BENCH=OFF
  cmake --build build-tsan -j"$JOBS" --target tsan_streams tsan_alloc tsan_engine tsan_persist tsan_train tsan_daemon kasminad
  # A race report makes the program exit 66 (tsan_daemon: its own or kasminad's); tests/tsan.supp
  # names third-party code only.
  OPENBLAS_NUM_THREADS=1 TSAN_OPTIONS="halt_on_error=0 exitcode=66 suppressions=$PWD/tests/tsan.supp" \
    ctest --test-dir build-tsan --output-on-failure -j1 -R '^tsan_(streams|alloc|engine|persist|train|daemon)$' \
          --timeout 120
fi
echo "test.sh: all suites passed"
