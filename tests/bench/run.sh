#!/usr/bin/env bash
# Runs the benchmarks with PyTorch as the reference in the same invocation, alternating the two
# sides (the VM's speed drifts), and prints a table of medians and ratios.
#   tests/bench/run.sh [build dir]         device runtime: GEMM, ops, allocator
#   tests/bench/run.sh model [build dir]   engine: blended forward and Evaluate (bench_model.c
#                                          against torch_model.py: esper-lite's own code on the
#                                          same weights and inputs), the CNN forward over gRPC (a
#                                          kasminad of the build on a Unix socket), the base-8
#                                          CNN, and the allocator in steady state
#   tests/bench/run.sh train [build dir]   training: TrainStep over the Unix socket against
#                                          esper's process_train_batch (CNN base 32 batch 128,
#                                          TinyStories 8 x 256), first-step losses of both sides,
#                                          allocations per step
# (build dir default: build; built with the benchmarks if needed; use a Release build.)
# model and train need ESPER_SRC: a checkout of tachyon-beep/esper-lite at commit 2016337e
# (tests/bench/esper_shims.py). PyTorch runs in two tuned configurations, 1 thread and
# threads = cores (torch and OpenBLAS), both with the OpenBLAS kernels kasmina runs
# (OPENBLAS_CORETYPE: torch's linear layers and matmuls run on the same OpenBLAS) and glibc told
# to keep big temporaries mapped; "torch best" is the faster of the two in each round. It also
# runs as shipped (no environment: torch's default threads, OpenBLAS's own CPU detection).
# kasmina runs with OPENBLAS_CORETYPE unset whatever the caller's environment says: the engine's
# own choice; KASMINA_CPU_NO_AVX512=1 makes it take its portable paths on an AVX-512 CPU.
# Environment: ROUNDS, CNN_REPS, TF_REPS, WIRE_REPS, CNN_TRAIN_REPS, TF_TRAIN_REPS, SHIP_EVERY,
# ROWS (a subset of the mode's rows), KEEP=<dir> (keep the raw result lines).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=runtime
case ${1:-} in
  model | train)
    MODE=$1
    shift
    ;;
esac
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
# The engine's CPU vector path: its elementwise kernels are target_clones (avx512f, avx2,
# default) and its Winograd convolutions have AVX-512 kernels and a portable path.
vector_path() {
  local flags off=${KASMINA_CPU_NO_AVX512:-}
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  if [[ $flags == *" avx512f"* ]] && { [ -z "$off" ] || [ "$off" = 0 ]; }; then
    echo "vector path AVX-512 (avx512f clones, AVX-512 Winograd)"
  elif [[ $flags == *" avx512f"* ]]; then
    echo "vector path: AVX-512 CPU with KASMINA_CPU_NO_AVX512=$off (portable Winograd)"
  elif [[ $flags == *" avx2"* ]]; then
    echo "vector path AVX2 (avx2 clones, portable Winograd: no AVX-512 on this CPU)"
  else
    echo "vector path portable C (no AVX2)"
  fi
}

if [ "$MODE" = model ] || [ "$MODE" = train ]; then
  # One long-lived server per side, models built once, driven call by call: bench_model serve
  # (kasmina in-process, and through libkasmina-client a kasminad of this build on a Unix socket
  # in the temporary directory: --no-persist, 3 CPU devices, 512 MiB messages, defaults
  # otherwise) and three torch_model.py servers running esper-lite's own code (ESPER_SRC):
  #   t1  1 thread  (torch and OpenBLAS), the glibc knobs, OPENBLAS_CORETYPE = kasmina's core
  #   t2  $NPROC threads, the same knobs
  #   s   as shipped: no environment at all (torch's default threads, OpenBLAS's own detection
  #       and threads, glibc's malloc defaults)
  # "torch best" of a round is the faster of t1 and t2 in that round. Every row is warmed up
  # once on each side (a training row: two steps, whose losses both sides print), then each
  # round runs, per row, kasmina, t1, t2 and, every SHIP_EVERY-th round, s, each the median of
  # the row's reps, with a short pause before each so the other sides' spinning threads sleep.
  # Rows only kasmina has (over the wire, in-process training) are compared with torch's row
  # of the same work in the same round.
  if [ -z "${ESPER_SRC:-}" ]; then
    echo "run.sh: ESPER_SRC is not set: the PyTorch side runs esper-lite's own code; set it to a" \
      "checkout of tachyon-beep/esper-lite at commit 2016337e (on the project machine:" \
      "ESPER_SRC=/work/esper-lite)" >&2
    exit 2
  fi
  export ESPER_SRC
  ROUNDS=${ROUNDS:-4}
  CNN_REPS=${CNN_REPS:-2}
  TF_REPS=${TF_REPS:-1}
  WIRE_REPS=${WIRE_REPS:-20}
  CNN_TRAIN_REPS=${CNN_TRAIN_REPS:-3}
  TF_TRAIN_REPS=${TF_TRAIN_REPS:-1}
  SHIP_EVERY=${SHIP_EVERY:-4}
  if [ "$MODE" = model ]; then
    DEF_ROWS="cnn_forward cnn_forward_rpc cnn_forward_rpc_wire cnn_eval_k8 cnn_eval_k8_seq
              cnn8_forward tf_forward tf_eval_k2"
  else
    DEF_ROWS="cnn_train cnn_train_inproc tf_train tf_train_inproc"
  fi
  ROWS=${ROWS:-$DEF_ROWS} # ROWS="cnn_train" runs a subset
  cmake --build "$BUILD" -j"$NPROC" --target bench_model kasminad >/dev/null
  KSM=$BUILD/tests/bench_model
  T0=$(date +%s)
  KCORE=$("${KSM_ENV[@]}" "$KSM" export "$OUT" | sed -n 's/^info openblas_core=//p')
  KNOBS=(MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824
         OPENBLAS_CORETYPE="$KCORE")
  T1=(env "${KNOBS[@]}" TORCH_THREADS=1 OPENBLAS_NUM_THREADS=1)
  T2=(env "${KNOBS[@]}" TORCH_THREADS="$NPROC" OPENBLAS_NUM_THREADS="$NPROC")
  SHIPPED=(env -u OPENBLAS_NUM_THREADS -u TORCH_THREADS -u MALLOC_MMAP_MAX_
           -u MALLOC_TRIM_THRESHOLD_ -u MALLOC_TOP_PAD_ -u OPENBLAS_CORETYPE)
  KD_CUDA=--no-cuda # the daemon on the engine side's device kind (tests/bench/gpu.sh: CUDA)
  case ${KASMINA_BENCH_DEVICE:-} in cuda*) KD_CUDA= ;; esac
  "${KSM_ENV[@]}" "$BUILD/kasminad" --no-persist --listen "unix:$OUT/kasminad.sock" \
    --log-level warn --cpu-devices 3 --max-message-bytes 512M --max-reply-bytes 512M \
    $KD_CUDA &
  KPID=$!
  trap 'kill $KPID 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$OUT"/*.txt "$KEEP"/; fi; rm -rf "$OUT"' EXIT
  SIDES="k t1 t2 s"
  for side in $SIDES; do mkfifo "$OUT/$side.in" "$OUT/$side.out"; done
  "${KSM_ENV[@]}" "$KSM" serve "$OUT" "unix:$OUT/kasminad.sock" <"$OUT/k.in" >"$OUT/k.out" &
  PIDS=$!
  PID_k="$! $KPID" # the kasmina side's CPU time: bench_model and the daemon
  exec 3>"$OUT/k.in" 4<"$OUT/k.out"
  "${T1[@]}" /usr/bin/python3 tests/bench/torch_model.py "$OUT" <"$OUT/t1.in" >"$OUT/t1.out" &
  PIDS="$PIDS $!"
  PID_t1=$!
  exec 5>"$OUT/t1.in" 6<"$OUT/t1.out"
  "${T2[@]}" /usr/bin/python3 tests/bench/torch_model.py "$OUT" <"$OUT/t2.in" >"$OUT/t2.out" &
  PIDS="$PIDS $!"
  PID_t2=$!
  exec 7>"$OUT/t2.in" 8<"$OUT/t2.out"
  "${SHIPPED[@]}" /usr/bin/python3 tests/bench/torch_model.py "$OUT" <"$OUT/s.in" \
    >"$OUT/s.out" &
  PIDS="$PIDS $!"
  PID_s=$!
  exec 9>"$OUT/s.in" 10<"$OUT/s.out"
  # ask <side> <command>: send one command, log the answer lines up to its last one.
  ask() {
    local fin fout line
    case $1 in k) fin=3 fout=4 ;; t1) fin=5 fout=6 ;; t2) fin=7 fout=8 ;; *) fin=9 fout=10 ;; esac
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
  # kasmina only: compared with torch's row of the same work (KTORCH below)
  konly() { case $1 in *_rpc* | *_inproc) return 0 ;; *) return 1 ;; esac; }
  reps_of() {
    case $1 in
      tf_train*) echo "$TF_TRAIN_REPS" ;; tf_*) echo "$TF_REPS" ;; *_wire) echo "$WIRE_REPS" ;;
      *_train*) echo "$CNN_TRAIN_REPS" ;; *) echo "$CNN_REPS" ;;
    esac
  }
  # CPU time (user + system, every thread) of a side's processes, in clock ticks: the timed
  # calls also log "cpu name=<row> ms=<CPU ms per call>", which a shared machine's load
  # disturbs far less than wall time.
  TICK_MS=$(awk -v t="$(getconf CLK_TCK)" 'BEGIN{print 1000 / t}')
  ticks() {
    local p t=0 v pids
    eval "pids=\$PID_$1"
    for p in $pids; do
      v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
      t=$((t + v))
    done
    echo $t
  }
  timed() { # timed <side> <row> <reps>
    local c0 c1
    c0=$(ticks "$1")
    ask "$1" "$2 $3"
    c1=$(ticks "$1")
    case $(tail -n 1 "$OUT/$1.txt") in
      row*) awk -v n="$2" -v d=$((c1 - c0)) -v r="$3" -v m="$TICK_MS" \
              'BEGIN{printf "cpu name=%s ms=%.1f\n", n, d * m / r}' >>"$OUT/$1.txt" ;;
    esac
  }
  for side in $SIDES; do ask $side ""; done # "ready"
  for w in $ROWS; do
    for side in $SIDES; do
      if [ $side = k ] || ! konly "$w"; then ask $side "$w 0"; fi
    done
  done
  for r in $(seq 1 "$ROUNDS"); do
    for w in $ROWS; do
      sides="k t1 t2"
      [ $(( (r - 1) % SHIP_EVERY )) = 0 ] && sides="k t1 t2 s"
      konly "$w" && sides=k
      for side in $sides; do
        sleep 0.2
        timed $side "$w" "$(reps_of "$w")"
      done
    done
  done
  ask k mem
  for fd in 3 5 7 9; do echo quit >&$fd; done
  wait $PIDS
  kill $KPID
  wait $KPID || true
  machine
  echo "kasmina: CPU backend, $NPROC pool threads (OpenBLAS set to 1 thread: sgemm tiles run on the pool)," \
    "OpenBLAS $KCORE kernels (OPENBLAS_CORETYPE unset: the engine's choice), $(vector_path)," \
    "glibc malloc defaults"
  echo "torch 1t: $(grep -m1 '^info' "$OUT/t1.txt" | cut -d' ' -f2-), OPENBLAS_NUM_THREADS=1;" \
    "torch ${NPROC}t: threads=$NPROC, OPENBLAS_NUM_THREADS=$NPROC; both OPENBLAS_CORETYPE=$KCORE" \
    "(kasmina's), MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=16GiB MALLOC_TOP_PAD_=1GiB;" \
    "torch best = the faster of the two in each round"
  echo "torch as shipped: $(grep -m1 '^info' "$OUT/s.txt" | cut -d' ' -f2-), no env"
  echo "PyTorch side: esper-lite's own code (ESPER_SRC=$ESPER_SRC, tests/bench/esper_shims.py)"
  echo "kasminad (rpc rows, TrainStep): this build, --no-persist, a Unix socket, 3 CPU devices;" \
    "C client (libkasmina-client) in bench_model"
  echo "rounds: $ROUNDS (as shipped: every $SHIP_EVERY), per round the median of $CNN_REPS (CNN)" \
    "/ $TF_REPS (TF) / $CNN_TRAIN_REPS (CNN train) / $TF_TRAIN_REPS (TF train) calls after the" \
    "warm-up; wall $(( $(date +%s) - T0 )) s"
  echo
  # Medians over rounds (mean of the middle two for an even count).
  mid() { sort -g | awk '{a[NR]=$1} END{if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2];
                                     else printf "%.6g\n", (a[NR/2]+a[NR/2+1])/2}'; }
  col() { { grep "^row name=$2 " "$OUT/$1.txt" || true; } | sed "s/.*$3=//; s/ .*//"; }
  # per round: the faster of t1 and t2 (its per_s; for ms the smaller)
  best() {
    paste <(col t1 "$1" per_s) <(col t2 "$1" per_s) | awk 'NF==2{print ($1 > $2 ? $1 : $2)}'
  }
  printf '%-38s %-6s %8s %8s %8s %8s %8s %17s %7s %7s\n' "row (throughput, median of rounds)" \
    "unit" "kasmina" "torch1t" "torch${NPROC}t" "best" "shipped" "k/best (range)" "k/ship" "goal"
  while IFS='|' read -r mode label krow trow goal; do
    [ "$mode" = "$MODE" ] || continue
    case " $(echo $ROWS) " in *" $krow "*) ;; *) continue ;; esac
    k=$(col k "$krow" per_s | mid)
    t1=$(col t1 "$trow" per_s | mid)
    t2=$(col t2 "$trow" per_s | mid)
    b=$(best "$trow" | mid)
    s=$(col s "$trow" per_s | mid)
    u=$(grep -m1 "^row name=$trow " "$OUT/t1.txt" | sed 's/.*unit=//' || true)
    if grep -q "^unimplemented name=$krow " "$OUT/k.txt"; then
      k="unimpl."
      rr="kasmina: unimplemented"
      rs="-"
    else
      # ratios of the calls made side by side in each round, then their median and range
      ratios=$(paste <(col k "$krow" per_s) <(best "$trow") | awk 'NF==2{print $1 / $2}')
      rr=$(echo "$ratios" | awk 'NF' | sort -g | awk '{a[NR]=$1} END{if (NR==0) print "-";
        else {m = NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2;
              printf "%.2f (%.2f-%.2f)", m, a[1], a[NR]}}')
      rs=$(awk -v k="$k" -v t="$s" 'BEGIN{if (t+0 > 0 && k+0 > 0) printf "%.2f", k/t; else print "-"}')
    fi
    printf '%-38s %-6s %8s %8s %8s %8s %8s %17s %7s %7s\n' "$label" "$u" "$k" "$t1" "$t2" "$b" \
      "$s" "$rr" "$rs" "$goal"
  done <<'TABLE'
model|a. CNN forward b128|cnn_forward|cnn_forward|>= 1.5
model|a. CNN Forward over gRPC b128|cnn_forward_rpc|cnn_forward|>= 1.3
model|b. CNN Evaluate K=8 vs esper fused|cnn_eval_k8|cnn_eval_k8|>= 1.5
model|b. CNN Evaluate K=8 vs 8 seq. val.|cnn_eval_k8|cnn_eval_k8_seq|>= 2
model|CNN base 8 forward b128 (cifar_base.)|cnn8_forward|cnn8_forward|-
model|c. TF forward 8x256|tf_forward|tf_forward|>= 1.2
model|c. TF Evaluate K=2 vs esper fused|tf_eval_k2|tf_eval_k2|-
train|CNN TrainStep over gRPC b128|cnn_train|cnn_train|>= 2
train|CNN train step in-process b128|cnn_train_inproc|cnn_train|-
train|TF TrainStep over gRPC 8x256 lora+mlp|tf_train|tf_train|>= 1.5
train|TF train step in-process 8x256|tf_train_inproc|tf_train|-
TABLE
  echo
  echo "median ms per call (kasmina / torch 1t / torch ${NPROC}t / as shipped):"
  for n in $ROWS; do
    printf '  %-22s %10s %10s %10s %10s\n' "$n" "$(col k "$n" ms | mid)" "$(col t1 "$n" ms | mid)" \
      "$(col t2 "$n" ms | mid)" "$(col s "$n" ms | mid)"
  done
  echo
  # CPU time per call (all threads; kasmina: bench_model + kasminad): less disturbed by the
  # machine's other load than wall time, and what a side costs on a busy machine.
  cpucol() { { grep "^cpu name=$2 " "$OUT/$1.txt" || true; } | sed "s/.*ms=//"; }
  echo "median CPU ms per call, all threads (kasmina / torch 1t / torch ${NPROC}t / as shipped):"
  for n in $ROWS; do
    printf '  %-22s %10s %10s %10s %10s\n' "$n" "$(cpucol k "$n" | mid)" "$(cpucol t1 "$n" | mid)" \
      "$(cpucol t2 "$n" | mid)" "$(cpucol s "$n" | mid)"
  done
  echo
  if [ "$MODE" = model ] && case " $(echo $ROWS) " in *" cnn_forward_rpc_wire "*) true ;; *) false ;; esac; then
    # The wire's cost per call: the Forward request to a missing model (everything but the
    # engine and the 5 KB reply), and the per-round difference of the rpc and in-process calls
    # (noisier: two forwards' jitter).
    inproc=$(col k cnn_forward ms | mid)
    wire=$(col k cnn_forward_rpc_wire ms | mid)
    diff=$(paste <(col k cnn_forward_rpc ms) <(col k cnn_forward ms) | awk 'NF==2{print $1 - $2}' | mid)
    echo "Forward over gRPC, overhead per call against the in-process call ($inproc ms):"
    awk -v w="$wire" -v d="$diff" -v i="$inproc" 'BEGIN{
      printf "  wire (request to a missing model, median of %s):  %.3f ms = %.2f %%\n", "'"$WIRE_REPS"' calls", w, 100*w/i;
      printf "  rpc - in-process (median of per-round differences): %.3f ms = %.2f %%\n", d, 100*d/i}'
    echo
  fi
  if grep -q '^check' "$OUT/t1.txt" "$OUT/k.txt"; then
    echo "numerics (torch 1t vs kasmina; max|torch-kasmina|/max|torch|, accuracy in points):"
    grep '^check' "$OUT/t1.txt" | sed 's/^check name=/  /' || true
    grep '^check' "$OUT/k.txt" | sed 's/^check name=/  (kasminad vs the in-process engine) /' || true
  fi
  if grep -q '^loss ' "$OUT/k.txt" "$OUT/t1.txt" 2>/dev/null; then
    echo
    echo "first training steps from the same weights on the same batch (loss; correct/total):"
    printf '  %-18s %4s %-27s %-27s %-27s %s\n' row step kasmina "torch 1t" "torch ${NPROC}t" \
      "|k-t1|/|t1|"
    lossf() { { grep "^loss name=$2 step=$3 " "$OUT/$1.txt" || true; } | head -1 |
              awk '{for(i=1;i<=NF;i++){split($i,kv,"="); v[kv[1]]=kv[2]}}
                   END{if (v["loss"]!="") printf "%s (%s/%s)", v["loss"], v["correct"], v["total"]}'; }
    lossv() { lossf "$@" | sed 's/ .*//'; }
    for krow in $ROWS; do
      case $krow in *train*) ;; *) continue ;; esac
      trow=${krow%_inproc}
      for st in 0 1; do
        kl=$(lossf k "$krow" $st)
        [ -n "$kl" ] || kl="-"
        printf '  %-18s %4s %-27s %-27s %-27s %s\n' "$krow" $st "$kl" "$(lossf t1 "$trow" $st)" \
          "$(lossf t2 "$trow" $st)" "$(awk -v a="$(lossv k "$krow" $st)" -v b="$(lossv t1 "$trow" $st)" \
          'BEGIN{if (a == "" || b == "") print "-"; else { d = a - b; if (d < 0) d = -d;
                 if (b < 0) b = -b; printf "%.3g", d / b }}')"
      done
    done
    grep '^unimplemented' "$OUT/k.txt" | sed 's/^unimplemented name=/  kasmina: unimplemented: /' || true
  fi
  echo
  # Issue 7 e / issue 14 part 9 on the engine's real workload: the device allocator over each
  # row's timed calls (after its warm-up). allocs: requests to the caching allocator (served
  # from its cache or by a new device allocation); dev.allocs: new device memory; mallocs: glibc
  # malloc & co. calls of the benchmark process during the calls (in-process rows).
  echo "allocator in steady state (the timed calls after each row's warm-up):"
  printf '  %-22s %-15s %5s %11s %10s %11s %13s %13s %6s %12s\n' row device calls "allocs/call" \
    "from cache" "dev.allocs" "peak reserved" "peak alloc'd" ratio "mallocs/call"
  grep '^mem ' "$OUT/k.txt" | while read -r line; do
    f() { echo "$line" | sed "s/.* $1=//; s/ .*//"; }
    awk -v n="$(f name)" -v d="$(f device)" -v c="$(f calls)" -v a="$(f allocs)" \
      -v h="$(f cache_hits)" -v da="$(f device_allocs)" -v r="$(f peak_reserved)" \
      -v p="$(f peak_allocated)" -v m="$(f mallocs)" 'BEGIN{
      fc = a > 0 ? sprintf("%.1f %%", 100*h/a) : "- (0/0)";
      mc = m < 0 ? "-" : sprintf("%.1f", m / c);
      printf "  %-22s %-15s %5d %11.1f %10s %11d %10.1f MB %10.1f MB %6.3f %12s\n", n, d, c, a/c, fc,
        da, r/1e6, p/1e6, r/p, mc}'
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
echo "kasmina: OpenBLAS $KCORE kernels (OPENBLAS_CORETYPE unset: the engine's choice), $(vector_path)"
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
