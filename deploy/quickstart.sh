#!/usr/bin/env bash
# Installs what is needed, builds kasmina and starts kasminad in the foreground on the embedded
# CPU backend with a demo model. Stop it with Ctrl-C (SIGINT) or SIGTERM.
# Extra arguments are passed to kasminad, e.g. ./deploy/quickstart.sh --cpu-devices 2
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}

./deploy/install-deps.sh
cmake -S . -B build -DKASMINA_CUDA=OFF -DKASMINA_BUILD_BENCH=OFF >/dev/null
cmake --build build -j"$JOBS" --target kasminad
echo "quickstart: starting kasminad (Ctrl-C to stop)"
exec ./build/kasminad --demo --no-cuda "$@"
