#!/usr/bin/env bash
# Installs what is needed, builds kasmina and starts kasminad in the foreground on the embedded
# CPU backend with a demo model. Stop it with Ctrl-C (SIGINT) or SIGTERM.
# Extra arguments are passed to kasminad, e.g. ./deploy/quickstart.sh --cpu-devices 2
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}

./deploy/install-deps.sh
cmake -S . -B build -DKASMINA_CUDA=OFF -DKASMINA_BUILD_BENCH=OFF >/dev/null
cmake --build build -j"$JOBS" --target kasminad kasminactl kasmina_python_stubs
# The Python package: build/client/python holds it with its stubs; the wheel goes to build/wheels.
/usr/bin/python3 -m pip wheel -q --no-build-isolation --no-deps -w build/wheels build/client/python
sock=/run/kasmina/kasminad.sock
[ "$(id -u)" != 0 ] && [ -n "${XDG_RUNTIME_DIR:-}" ] && sock=$XDG_RUNTIME_DIR/kasmina/kasminad.sock
cat <<EOF
quickstart: built build/kasminad, build/client/kasminactl, $(ls build/wheels/kasmina_client-*.whl)
quickstart: kasminad will listen on unix:$sock (--demo: a demo model; --no-persist: no state kept)
next, in another shell:
  ./build/client/kasminactl health
  ./build/client/kasminactl models
  /usr/bin/python3 -m venv --system-site-packages ~/kasmina-venv
  ~/kasmina-venv/bin/pip install --no-build-isolation --no-deps build/wheels/kasmina_client-*.whl
  ~/kasmina-venv/bin/python -c 'import kasmina_client; print(kasmina_client.Client().list_models())'
quickstart: starting kasminad (Ctrl-C to stop)
EOF
exec ./build/kasminad --demo --no-cuda "$@"
