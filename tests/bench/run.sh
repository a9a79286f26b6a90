#!/usr/bin/env bash
# Runs the device-runtime benchmarks with PyTorch as the reference in the same invocation,
# alternating the two sides (the VM's speed drifts), and prints a table of medians and ratios.
#   tests/bench/run.sh [build dir]     (default: build; built with the benchmarks if needed)
# PyTorch gets its best configuration on this machine: threads = cores for torch and OpenBLAS,
# and glibc told to keep big temporaries mapped.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:-build}
ROUNDS=${ROUNDS:-3}
NPROC=$(nproc)
if [ ! -x "$BUILD/tests/bench_gemm" ]; then
  cmake -S . -B "$BUILD" -DKASMINA_BUILD_BENCH=ON >/dev/null
  cmake --build "$BUILD" -j"$NPROC" --target bench_gemm bench_alloc
fi
export OPENBLAS_NUM_THREADS=$NPROC
TUNED=(env MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
       TORCH_THREADS=$NPROC)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
SIZES="256 512 1024 2048"
for r in $(seq 1 "$ROUNDS"); do
  "$BUILD/tests/bench_gemm" 5 $SIZES >>"$OUT/ksm.txt"
  "${TUNED[@]}" /usr/bin/python3 tests/bench/torch_gemm.py 5 $SIZES >>"$OUT/torch.txt"
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
echo "torch $(/usr/bin/python3 -c 'import torch;print(torch.__version__)') threads=$NPROC, OPENBLAS_NUM_THREADS=$NPROC, MALLOC_MMAP_MAX_=0"
printf '%-10s %14s %14s %10s\n' "gemm n" "kasmina GF/s" "torch GF/s" "ratio"
for n in $SIZES; do
  k=$(grep "n=$n " "$OUT/ksm.txt" | sed 's/.*gflops=//' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  t=$(grep "n=$n " "$OUT/torch.txt" | sed 's/.*gflops=//' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  printf '%-10s %14s %14s %10s\n' "$n" "$k" "$t" "$(awk -v k="$k" -v t="$t" 'BEGIN{printf "%.2f", k/t}')"
done
echo
"$BUILD/tests/bench_alloc" 50 32
