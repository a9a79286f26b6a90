#!/usr/bin/env bash
# Installs what is needed, builds kasmina and runs every test suite:
#   1. build/       the normal build (with the CUDA plugin when nvcc is present), all ctest suites
#   2. build-asan/  CUDA off, AddressSanitizer + UndefinedBehaviorSanitizer, the unit suites
# Usage: ./deploy/test.sh            (from anywhere)
# Env:   JOBS (default nproc), KASMINA_SKIP_ASAN=1 to skip step 2.
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
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
  LSAN_OPTIONS=suppressions="$PWD/tests/lsan.supp" \
    ctest --test-dir build-asan --output-on-failure -j"$JOBS" -L 'unit|engine|daemon' --timeout 900
fi
echo "test.sh: all suites passed"
