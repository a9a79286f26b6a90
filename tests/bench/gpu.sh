#!/usr/bin/env bash
# The performance tables on a GPU machine (docs/performance.md, "GPU plan"): builds the CUDA
# plugin for sm_80/sm_90, runs the GPU conformance suite (every op against the CPU backend),
# then the engine benchmarks with the engine on cuda:0 (run.sh model: forward, Evaluate; run.sh
# train: TrainStep, whose rows say "kasmina: unimplemented" while the engine trains on the CPU
# only), alternating with esper-lite's own code in PyTorch (on the GPU when its torch has CUDA,
# else on the CPU, which the tables then say), and the control RPCs.
#
#     ESPER_SRC=/path/to/esper-lite tests/bench/gpu.sh [build-dir]        (default build-gpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:-build-gpu}
: "${ESPER_SRC:?set ESPER_SRC to a checkout of tachyon-beep/esper-lite at commit 2016337e}"
export ESPER_SRC
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv || echo "gpu.sh: nvidia-smi not found"
./deploy/install-deps.sh
cmake -S . -B "$B" -DKASMINA_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null
cmake --build "$B" -j"$(nproc)"
echo "== GPU conformance (CUDA vs the CPU backend) =="
ctest --test-dir "$B" -L gpu --output-on-failure
tdev=cpu
if /usr/bin/python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    2>/dev/null; then
  tdev=cuda
fi
echo "== engine on cuda:0, PyTorch on $tdev =="
KASMINA_BENCH_DEVICE=cuda:0 KASMINA_CUDA_PLUGIN="$PWD/$B/libkasmina_cuda.so" \
  TORCH_DEVICE=$tdev tests/bench/run.sh model "$B"
echo "== training on cuda:0, PyTorch on $tdev =="
KASMINA_BENCH_DEVICE=cuda:0 KASMINA_CUDA_PLUGIN="$PWD/$B/libkasmina_cuda.so" \
  TORCH_DEVICE=$tdev tests/bench/run.sh train "$B"
echo "== control RPCs =="
"$B/tests/bench_rpc" "$B/kasminad" 3 "$B/client/python"
