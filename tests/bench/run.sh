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
fi
cmake --build "$BUILD" -j"$NPROC" --target bench_gemm bench_alloc bench_ops >/dev/null
export OPENBLAS_NUM_THREADS=$NPROC
TUNED=(env MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
       TORCH_THREADS=$NPROC)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
SIZES="256 512 1024 2048"
for r in $(seq 1 "$ROUNDS"); do
  "$BUILD/tests/bench_gemm" 5 $SIZES >>"$OUT/ksm.txt"
  "${TUNED[@]}" /usr/bin/python3 tests/bench/torch_gemm.py 5 $SIZES >>"$OUT/torch.txt"
  "$BUILD/tests/bench_ops" 5 >>"$OUT/ksm_ops.txt"
  "${TUNED[@]}" /usr/bin/python3 tests/bench/torch_ops.py 5 >>"$OUT/torch_ops.txt"
done
# Median over rounds of the per-round medians, for one key in one file.
med() { grep "$1" "$2" | sed "s/.*$3=//" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
echo "torch $(/usr/bin/python3 -c 'import torch;print(torch.__version__)') threads=$NPROC, OPENBLAS_NUM_THREADS=$NPROC, MALLOC_MMAP_MAX_=0"
printf '%-10s %14s %14s %10s\n' "gemm n" "kasmina GF/s" "torch GF/s" "ratio"
for n in $SIZES; do
  k=$(med "n=$n " "$OUT/ksm.txt" gflops)
  t=$(med "n=$n " "$OUT/torch.txt" gflops)
  printf '%-10s %14s %14s %10s\n' "$n" "$k" "$t" "$(awk -v k="$k" -v t="$t" 'BEGIN{printf "%.2f", k/t}')"
done
echo
printf '%-32s %12s %12s %18s\n' "op" "kasmina ms" "torch ms" "speed-up vs torch"
for name in $(sed 's/op name=\([^ ]*\).*/\1/' "$OUT/ksm_ops.txt" | awk '!seen[$0]++'); do
  k=$(med "name=$name " "$OUT/ksm_ops.txt" median_ms)
  t=$(med "name=$name " "$OUT/torch_ops.txt" median_ms)
  printf '%-32s %12s %12s %18s\n' "$name" "$k" "$t" "$(awk -v k="$k" -v t="$t" 'BEGIN{printf "%.2f", t/k}')"
done
echo
"$BUILD/tests/bench_alloc" 50 32
