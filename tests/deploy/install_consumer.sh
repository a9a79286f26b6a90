#!/usr/bin/env bash
# A C user of an installed kasmina: `cmake --install` into a temporary prefix, then two programs
# outside the tree, one built with find_package(kasmina) (kasmina::engine, kasmina::client) and
# one with pkg-config (kasmina-client), each run against what was installed.
# Usage: install_consumer.sh <build dir>
set -euo pipefail
BUILD=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$BUILD" --prefix "$tmp/prefix" >"$tmp/install.log"
for f in include/kasmina/kasmina.h include/kasmina/client.h share/kasmina/proto/kasmina/v1/kasmina.proto \
  share/kasmina/proto/grpc/health/v1/health.proto \
  share/kasmina/proto/grpc/reflection/v1alpha/reflection.proto \
  share/kasmina/proto/grpc/reflection/v1/reflection.proto; do
  [ -f "$tmp/prefix/$f" ] || { echo "FAIL: $f not installed"; exit 1; }
done
# The installed .proto files are a usable set: protoc compiles them from the install tree alone.
if command -v protoc >/dev/null; then
  (cd "$tmp/prefix/share/kasmina/proto" && protoc -I. --descriptor_set_out="$tmp/installed.pb" \
    kasmina/v1/kasmina.proto grpc/health/v1/health.proto grpc/reflection/v1/reflection.proto) ||
    { echo "FAIL: protoc cannot compile the installed .proto files"; exit 1; }
fi
libdir=$(dirname "$(find "$tmp/prefix" -name 'libkasmina-client.so' | head -n1)")
[ -n "$libdir" ] || { echo "FAIL: libkasmina-client.so not installed"; exit 1; }
if nm -D --defined-only "$libdir/libkasmina-client.so" | grep -q ' ksm_engine_new$'; then
  echo "FAIL: the client library carries the engine"; exit 1
fi

mkdir -p "$tmp/app"
cat >"$tmp/app/engine_app.c" <<'EOF'
#include <stdio.h>
#include <string.h>
#include <kasmina/errors.h>
#include <kasmina/kasmina.h>
int main(void)
{
    char err[256] = "";
    ksm_engine *e;
    struct ksm_engine_config cfg = {.cpu_devices = 1};
    if (ksm_engine_new(&cfg, &e, err, sizeof err) != 0) { printf("engine: %s\n", err); return 1; }
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN};
    spec.cnn.base_channels = 8;
    ksm_model *m;
    if (ksm_engine_model_create(e, "app", &spec, &m, err, sizeof err) != 0) {
        printf("create: %s\n", err);
        return 1;
    }
    printf("model %s, %s\n", ksm_model_id(m), ksm_strerror(KSM_ENOMODEL));
    ksm_model_unref(m);
    ksm_engine_free(e);
    return 0;
}
EOF
cat >"$tmp/app/client_app.c" <<'EOF'
#include <stdio.h>
#include <kasmina/client.h>
#include <kasmina/errors.h>
int main(void)
{
    ksm_client *c;
    struct ksm_client_error e;
    if (ksm_client_connect("unix:/nonexistent/kasminad.sock", NULL, &c, &e) != 0) return 1;
    ksm_client_close(c);
    printf("client ok, %s\n", ksm_err_name(KSM_EMAXSEEDS));
    return 0;
}
EOF
cat >"$tmp/app/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.25)
project(kasmina_user C)
find_package(kasmina 0.1 REQUIRED)
add_executable(engine_app engine_app.c)
target_link_libraries(engine_app PRIVATE kasmina::engine)
add_executable(client_app client_app.c)
target_link_libraries(client_app PRIVATE kasmina::client)
EOF
cmake -S "$tmp/app" -B "$tmp/app/build" -DCMAKE_PREFIX_PATH="$tmp/prefix" >"$tmp/app.log" 2>&1 ||
  { cat "$tmp/app.log"; echo "FAIL: find_package(kasmina)"; exit 1; }
cmake --build "$tmp/app/build" >>"$tmp/app.log" 2>&1 || { cat "$tmp/app.log"; echo "FAIL: build"; exit 1; }
out=$("$tmp/app/build/engine_app")
[ "$out" = "model app, no such model" ] || { echo "FAIL: engine_app printed '$out'"; exit 1; }
out=$("$tmp/app/build/client_app")
[ "$out" = "client ok, KSM_EMAXSEEDS" ] || { echo "FAIL: client_app printed '$out'"; exit 1; }

export PKG_CONFIG_PATH="$libdir/pkgconfig"
# shellcheck disable=SC2046
cc -o "$tmp/app/client_pc" "$tmp/app/client_app.c" $(pkg-config --cflags --libs kasmina-client)
out=$(LD_LIBRARY_PATH="$libdir" "$tmp/app/client_pc")
[ "$out" = "client ok, KSM_EMAXSEEDS" ] || { echo "FAIL: pkg-config client printed '$out'"; exit 1; }
# shellcheck disable=SC2046
cc -o "$tmp/app/engine_pc" "$tmp/app/engine_app.c" $(pkg-config --cflags --libs kasmina)
out=$("$tmp/app/engine_pc")
[ "$out" = "model app, no such model" ] || { echo "FAIL: pkg-config engine printed '$out'"; exit 1; }
echo "install_consumer: find_package(kasmina) and pkg-config users built and ran"
echo "1 passed, 0 failed"
