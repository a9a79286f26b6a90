#!/usr/bin/env bash
# kasminad starts on a GPU-less machine, reports the CPU fallback, logs its devices and exits 0
# on SIGTERM. Also: the binary itself links no CUDA library (it must start where none exist),
# and a bad option fails start-up naming the option.
# Usage: start_cpu_fallback.sh <path to kasminad>
set -u
BIN=$1
BUILD_DIR=$(dirname "$BIN")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*"; [ -f "$TMP/log" ] && sed 's/^/  log: /' "$TMP/log"; exit 1; }

# 1. No CUDA library among the executable's direct dependencies.
if ldd "$BIN" | grep -Eq 'libcuda|libcudart|libcublas'; then
  fail "kasminad links a CUDA library directly: $(ldd "$BIN" | grep -E 'cuda|cublas')"
fi

# 2. Start with 2 CPU devices; the plugin (if built) is found next to the binary.
"$BIN" --cpu-devices 2 --no-persist --listen "unix:$TMP/s/k.sock" >"$TMP/log" 2>&1 &
PID=$!
for _ in $(seq 1 300); do
  grep -q "kasminad ready" "$TMP/log" && break
  kill -0 $PID 2>/dev/null || fail "kasminad exited before it was ready"
  sleep 0.1
done
grep -q "kasminad ready" "$TMP/log" || fail "kasminad did not become ready in 30 s"
grep -q "falling back to the CPU backend" "$TMP/log" || fail "no CPU fallback line"
if [ -f "$BUILD_DIR/libkasmina_cuda.so" ]; then
  # The plugin loads but finds no device/driver: the reason is KSM_ENODEVICE, not a load error.
  grep -q "KSM_ENODEVICE" "$TMP/log" || fail "plugin present but fallback reason is not KSM_ENODEVICE"
fi
grep -q "device cpu:0" "$TMP/log" || fail "cpu:0 not logged"
grep -q "device cpu:1" "$TMP/log" || fail "cpu:1 not logged"
grep -q "primary backend: cpu" "$TMP/log" || fail "primary backend is not cpu"
kill -TERM $PID
wait $PID
RC=$?
[ $RC -eq 0 ] || fail "exit code $RC after SIGTERM"
grep -q "kasminad stopped" "$TMP/log" || fail "no clean stop line"

# 3. A plugin path that does not exist: clean fallback with KSM_ENOPLUGIN.
KASMINA_CUDA_PLUGIN=/nonexistent/libkasmina_cuda.so "$BIN" --no-persist --listen "unix:$TMP/s/k.sock" >"$TMP/log" 2>&1 &
PID=$!
for _ in $(seq 1 300); do grep -q "kasminad ready" "$TMP/log" && break; sleep 0.1; done
# SIGINT only once the handlers are installed (a loaded machine may take longer than 10 s).
grep -q "kasminad ready" "$TMP/log" || fail "kasminad (no plugin) did not become ready in 30 s"
grep -q "KSM_ENOPLUGIN" "$TMP/log" || fail "missing plugin not reported as KSM_ENOPLUGIN"
kill -INT $PID; wait $PID; RC=$?
[ $RC -eq 0 ] || fail "exit code $RC after SIGINT"

# 4. Bad options fail start-up with exit 2 and name the option and its range.
"$BIN" --cpu-devices 0 >"$TMP/log" 2>&1; RC=$?
[ $RC -eq 2 ] || fail "--cpu-devices 0 gave exit $RC, expected 2"
grep -q -- "--cpu-devices must be an integer in \[1, 16\]" "$TMP/log" || fail "bad option message"

echo "start_cpu_fallback: 4 checks passed"
