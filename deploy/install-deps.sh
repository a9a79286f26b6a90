#!/usr/bin/env bash
# Installs exactly what kasmina's build and tests need from Debian 12's archive. Idempotent:
# when everything is present it only checks (no apt-get update).
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config          # toolchain
  libuv1-dev                                # event loop
  libsystemd-dev                            # sd_notify: Type=notify, watchdog (optional at build)
  libjansson-dev                            # safetensors JSON header
  zlib1g-dev                                # compressed requests (rpc/inflate)
  libopenblas-dev                           # CPU backend GEMM
  libcriterion-dev                          # tests
  libgrpc-dev                               # gRPC C core (server and client)
  libprotobuf-c-dev protobuf-c-compiler     # protobuf-c runtime and protoc-c
  protobuf-compiler protobuf-compiler-grpc  # protoc + grpc_python_plugin (Python stubs)
  python3-grpcio python3-protobuf           # rpc tests and the Python client (/usr/bin/python3)
  python3-numpy                             # the Python client's array wrapper
  python3-yaml                              # deploy tests parse the Kubernetes/Prometheus YAML
  python3-setuptools python3-wheel python3-venv  # building and installing the Python wheel
  dataset-fashion-mnist                     # the Fashion-MNIST example and its CI run
  openssl                                   # rpc security tests make their certificates
  libmicrohttpd-dev                         # metrics listener (/metrics, status page)
  prometheus                                # integration test: a real Prometheus scrapes kasminad
  chromium                                  # integration test: the status page in headless Chromium
  clang                                     # libFuzzer targets (tests/fuzz), ASan/UBSan/TSan
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
