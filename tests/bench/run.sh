#!/usr/bin/env bash
# Runs the benchmarks with PyTorch as the reference in the same invocation, alternating the two
# sides (the VM's speed drifts), and prints a table of medians and ratios.
#   tests/bench/run.sh [build dir]         device runtime: GEMM, ops, allocator
#   tests/bench/run.sh model [build dir]   engine: blended forward and Evaluate (bench_model.c
#                                          against torch_model.py, same weights and inputs), the
#                                          CNN forward over gRPC (a kasminad of the build on a
#                                          Unix socket) and the allocator in steady state
# (build dir default: build; built with the benchmarks if needed; use a Release build.)
# PyTorch gets its best configuration on this machine: threads = cores for torch and OpenBLAS,
# the OpenBLAS kernels kasmina runs (OPENBLAS_CORETYPE: torch's linear layers and matmuls run on
# the same OpenBLAS), and glibc told to keep big temporaries mapped. kasmina runs with
# OPENBLAS_CORETYPE unset whatever the caller's environment says: the engine's own choice. The
# model mode also runs PyTorch as shipped (no environment: OpenBLAS's own CPU detection).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=runtime
if [ "${1:-}" = model ]; then
  MODE=model
  shift
fi
BUILD=${1:-build}
NPROC=$(nproc)
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -DKASMINA_BUILD_BENCH=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
export OPENBLAS_NUM_THREADS=$NPROC
KSM_ENV=(env -u OPENBLAS_CORETYPE)
# TUNED gets OPENBLAS_CORETYPE=<the core kasmina reports> below.
TUNED=(env MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
       TORCH_THREADS=$NPROC)
OUT=$(mktemp -d)
# KEEP=<dir>: copy the raw result lines (*.txt) there before the temporary directory goes.
trap 'if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$OUT"/*.txt "$KEEP"/; fi; rm -rf "$OUT"' EXIT
# Median over rounds of the per-round medians, for one key in one file.
med() { { grep "$1" "$2" || true; } | sed "s/.*$3=//; s/ .*//" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
machine() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
}

if [ "$MODE" = model ]; then
  # One long-lived server per side (bench_model serve, torch_model.py: models built and weights
  # loaded once), driven call by call: every row is warmed up once on each side, then each
  # round runs, per row, kasmina then torch (best) then, every SHIP_EVERY-th round, torch as
  # shipped, each the median of REPS calls (CNN_REPS for the CNN rows, TF_REPS for the
  # transformer), with a short pause before each so the other side's spinning threads sleep.
  # bench_model also drives a kasminad (this build's, --no-persist, a Unix socket in the
  # temporary directory, defaults otherwise) holding the same CNN: cnn_forward_rpc is
  # ksm_client_forward against it (compared with torch's cnn_forward of the same round), and
  # cnn_forward_rpc_wire (WIRE_REPS calls, kasmina only) the same request to a model id the
  # daemon does not hold: the per-call cost of the wire without the engine.
  ROUNDS=${ROUNDS:-4}
  CNN_REPS=${CNN_REPS:-2}
  TF_REPS=${TF_REPS:-1}
  WIRE_REPS=${WIRE_REPS:-20}
  SHIP_EVERY=${SHIP_EVERY:-4}
  ROWS="cnn_forward cnn_forward_rpc cnn_forward_rpc_wire cnn_eval_k8 cnn_eval_k8_seq tf_forward
        tf_eval_k2"
  cmake --build "$BUILD" -j"$NPROC" --target bench_model kasminad >/dev/null
  KSM=$BUILD/tests/bench_model
  # As shipped: torch's default threads, OpenBLAS's default, glibc's default malloc.
  SHIPPED=(env -u OPENBLAS_NUM_THREADS -u TORCH_THREADS -u MALLOC_MMAP_MAX_
           -u MALLOC_TRIM_THRESHOLD_ -u MALLOC_TOP_PAD_ -u OPENBLAS_CORETYPE)
  T0=$(date +%s)
  KCORE=$("${KSM_ENV[@]}" "$KSM" export "$OUT" | sed -n 's/^info openblas_core=//p')
  TUNED+=(OPENBLAS_CORETYPE="$KCORE")
  KD_CUDA=--no-cuda # the daemon on the engine side's device kind (tests/bench/gpu.sh: CUDA)
  case ${KASMINA_BENCH_DEVICE:-} in cuda*) KD_CUDA= ;; esac
  "${KSM_ENV[@]}" "$BUILD/kasminad" --no-persist --listen "unix:$OUT/kasminad.sock" \
    --log-level warn $KD_CUDA &
  KPID=$!
  trap 'kill $KPID 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$OUT"/*.txt "$KEEP"/; fi; rm -rf "$OUT"' EXIT
  for side in k t s; do mkfifo "$OUT/$side.in" "$OUT/$side.out"; done
  "${KSM_ENV[@]}" "$KSM" serve "$OUT" "unix:$OUT/kasminad.sock" <"$OUT/k.in" >"$OUT/k.out" &
  PIDS=$!
  exec 3>"$OUT/k.in" 4<"$OUT/k.out"
  "${TUNED[@]}" /usr/bin/python3 tests/bench/torch_model.py "$OUT" <"$OUT/t.in" >"$OUT/t.out" &
  PIDS="$PIDS $!"
  exec 5>"$OUT/t.in" 6<"$OUT/t.out"
  "${SHIPPED[@]}" /usr/bin/python3 tests/bench/torch_model.py "$OUT" <"$OUT/s.in" \
    >"$OUT/s.out" &
  PIDS="$PIDS $!"
  exec 7>"$OUT/s.in" 8<"$OUT/s.out"
  # ask <side> <command>: send one command, log the answer lines up to its last one.
  ask() {
    local fin fout line
    case $1 in k) fin=3 fout=4 ;; t) fin=5 fout=6 ;; *) fin=7 fout=8 ;; esac
    [ -n "$2" ] && echo "$2" >&"$fin"
    while true; do
      if ! read -r line <&"$fout"; then
        echo "run.sh: the $1 server died (see above)" >&2
        exit 1
      fi
      echo "$line" >>"$OUT/$1.txt"
      case $line in row* | ok* | skip* | ready) return ;; esac
    done
  }
  for side in k t s; do ask $side ""; done # "ready"
  for w in $ROWS; do
    for side in k t s; do ask $side "$w 0"; done
  done
  for r in $(seq 1 "$ROUNDS"); do
    for w in $ROWS; do
      reps=$CNN_REPS
      case $w in tf_*) reps=$TF_REPS ;; *_wire) reps=$WIRE_REPS ;; esac
      sides="k t"
      [ $(( (r - 1) % SHIP_EVERY )) = 0 ] && sides="k t s"
      case $w in *_rpc*) sides=k ;; esac # kasmina only: compared with torch's cnn_forward
      for side in $sides; do
        sleep 0.2
        ask $side "$w $reps"
      done
    done
  done
  ask k mem
  for fd in 3 5 7; do echo quit >&$fd; done
  wait $PIDS
  kill $KPID
  wait $KPID || true
  machine
  echo "kasmina: CPU backend, $NPROC pool threads (OpenBLAS set to 1 thread: sgemm tiles run on the pool)," \
    "OpenBLAS $KCORE kernels (OPENBLAS_CORETYPE unset: the engine's choice), glibc malloc defaults"
  echo "torch best: $(grep -m1 '^info' "$OUT/t.txt" | cut -d' ' -f2-), OPENBLAS_NUM_THREADS=$NPROC," \
    "OPENBLAS_CORETYPE=$KCORE (kasmina's), MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=16GiB MALLOC_TOP_PAD_=1GiB"
  echo "torch as shipped: $(grep -m1 '^info' "$OUT/s.txt" | cut -d' ' -f2-), no env"
  echo "kasminad (rpc rows): this build, --no-persist, a Unix socket, defaults otherwise;" \
    "C client (libkasmina-client) in bench_model"
  echo "rounds: $ROUNDS (as shipped: every $SHIP_EVERY), median of $CNN_REPS calls (CNN)" \
    "/ $TF_REPS (TF) per round after one warm-up call; wall $(( $(date +%s) - T0 )) s"
  echo
  # Medians over rounds (mean of the middle two for an even count).
  mid() { sort -g | awk '{a[NR]=$1} END{if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2];
                                     else printf "%.6g\n", (a[NR/2]+a[NR/2+1])/2}'; }
  col() { { grep "^row name=$2 " "$OUT/$1.txt" || true; } | sed "s/.*$3=//; s/ .*//"; }
  printf '%-35s %-6s %9s %9s %9s %16s %8s\n' "row (throughput, median of rounds)" "unit" \
    "kasmina" "torch" "shipped" "k/torch (range)" "k/ship"
  while IFS='|' read -r label krow trow; do
    k=$(col k "$krow" per_s | mid)
    t=$(col t "$trow" per_s | mid)
    s=$(col s "$trow" per_s | mid)
    u=$(grep -m1 "^row name=$krow " "$OUT/k.txt" | sed 's/.*unit=//')
    # ratios of the calls made side by side in each round, then their median and range
    ratios=$(paste <(col k "$krow" per_s) <(col t "$trow" per_s) | awk '{print $1 / $2}')
    rm_=$(echo "$ratios" | mid)
    lo=$(echo "$ratios" | sort -g | head -1)
    hi=$(echo "$ratios" | sort -g | tail -1)
    printf '%-35s %-6s %9s %9s %9s %16s %8s\n' "$label" "$u" "$k" "$t" "$s" \
      "$(awk -v m="$rm_" -v l="$lo" -v h="$hi" 'BEGIN{printf "%.2f (%.2f-%.2f)", m, l, h}')" \
      "$(awk -v k="$k" -v t="$s" 'BEGIN{printf "%.2f", k/t}')"
  done <<'TABLE'
a. CNN forward b128|cnn_forward|cnn_forward
a. CNN Forward over gRPC b128|cnn_forward_rpc|cnn_forward
b. CNN Evaluate K=8 vs torch fused|cnn_eval_k8|cnn_eval_k8
b. CNN Evaluate K=8 vs 8 seq. fwds|cnn_eval_k8|cnn_eval_k8_seq
c. TF forward 8x256|tf_forward|tf_forward
c. TF Evaluate K=2 vs torch fused|tf_eval_k2|tf_eval_k2
TABLE
  echo
  echo "median ms per call (kasmina / torch best / as shipped):"
  for n in $ROWS; do
    printf '  %-20s %10s %10s %10s\n' "$n" "$(col k "$n" ms | mid)" "$(col t "$n" ms | mid)" \
      "$(col s "$n" ms | mid)"
  done
  echo
  # The wire's cost per call: the Forward request to a missing model (everything but the engine
  # and the 5 KB reply), and the per-round difference of the rpc and in-process calls (noisier:
  # two forwards' jitter).
  inproc=$(col k cnn_forward ms | mid)
  wire=$(col k cnn_forward_rpc_wire ms | mid)
  diff=$(paste <(col k cnn_forward_rpc ms) <(col k cnn_forward ms) | awk '{print $1 - $2}' | mid)
  echo "Forward over gRPC, overhead per call against the in-process call ($inproc ms):"
  awk -v w="$wire" -v d="$diff" -v i="$inproc" 'BEGIN{
    printf "  wire (request to a missing model, median of %s):  %.3f ms = %.2f %%\n", "'"$WIRE_REPS"' calls", w, 100*w/i;
    printf "  rpc - in-process (median of per-round differences): %.3f ms = %.2f %%\n", d, 100*d/i}'
  echo
  echo "numerics (torch best vs kasmina; max|torch-kasmina|/max|torch|, accuracy in points):"
  grep '^check' "$OUT/t.txt" | sed 's/^check name=/  /'
  echo "  (kasminad vs the in-process engine, same weights and input:)"
  grep '^check' "$OUT/k.txt" | sed 's/^check name=/  /'
  echo
  # Issue 7 e on the engine's real workload: the device allocator over each row's timed calls
  # (after its warm-up call). The engine plans allocate their arenas once per shape, so a
  # steady-state call allocates nothing; the peaks include the model's weights and every plan.
  echo "allocator in steady state (the timed calls after each row's warm-up; CNN on cpu:0, TF on cpu:1):"
  printf '  %-20s %-15s %6s %7s %12s %8s %14s %14s %6s\n' row device calls allocs "from cache" \
    "dev.allocs" "peak reserved" "peak alloc'd" ratio
  grep '^mem ' "$OUT/k.txt" | while read -r line; do
    f() { echo "$line" | sed "s/.* $1=//; s/ .*//"; }
    awk -v n="$(f name)" -v d="$(f device)" -v c="$(f calls)" -v a="$(f allocs)" \
      -v h="$(f cache_hits)" -v da="$(f device_allocs)" -v r="$(f peak_reserved)" \
      -v p="$(f peak_allocated)" 'BEGIN{
      fc = a > 0 ? sprintf("%.1f %%", 100*h/a) : "100 % (0/0)";
      printf "  %-20s %-15s %6d %7d %12s %8d %11.1f MB %11.1f MB %6.3f\n", n, d, c, a, fc, da,
        r/1e6, p/1e6, r/p}'
  done
  exit 0
fi

ROUNDS=${ROUNDS:-3}
cmake --build "$BUILD" -j"$NPROC" --target bench_gemm bench_alloc bench_ops >/dev/null
KCORE=$("${KSM_ENV[@]}" "$BUILD/tests/bench_gemm" 1 64 | sed -n 's/^info openblas_core=//p')
TUNED+=(OPENBLAS_CORETYPE="$KCORE")
SIZES="256 512 1024 2048"
for r in $(seq 1 "$ROUNDS"); do
  "${KSM_ENV[@]}" "$BUILD/tests/bench_gemm" 5 $SIZES >>"$OUT/ksm.txt"
  "${TUNED[@]}" /usr/bin/python3 tests/bench/torch_gemm.py 5 $SIZES >>"$OUT/torch.txt"
  "${KSM_ENV[@]}" "$BUILD/tests/bench_ops" 5 >>"$OUT/ksm_ops.txt"
  "${TUNED[@]}" /usr/bin/python3 tests/bench/torch_ops.py 5 >>"$OUT/torch_ops.txt"
done
machine
echo "kasmina: OpenBLAS $KCORE kernels (OPENBLAS_CORETYPE unset: the engine's choice)"
echo "torch $(/usr/bin/python3 -c 'import torch;print(torch.__version__)') threads=$NPROC, OPENBLAS_NUM_THREADS=$NPROC, OPENBLAS_CORETYPE=$KCORE (kasmina's), MALLOC_MMAP_MAX_=0"
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
# Allocator (issue 7 e): batch 32 as in the docs, and two other batches (activations of a
# different size against the same workspaces).
for b in 32 8 48; do "${KSM_ENV[@]}" "$BUILD/tests/bench_alloc" 50 "$b"; done
