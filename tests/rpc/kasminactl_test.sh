#!/usr/bin/env bash
# kasminactl against a real kasminad on a temporary Unix socket: every subcommand's happy path
# (table and --json), --help on every subcommand, and the exit code of each status class.
# usage: kasminactl_test.sh KASMINAD KASMINACTL
set -u
KASMINAD=$1
CTL=$2
PY=/usr/bin/python3
TMP=$(mktemp -d /tmp/ksm-ctl-XXXXXX)
SOCK=$TMP/s.sock
fail=0
pid=

cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid"
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

bad() { echo "FAIL: $*"; fail=1; }

# ctl EXPECTED_RC args...: runs kasminactl --socket $SOCK args, output in $TMP/out.
ctl() {
    local want=$1
    shift
    "$CTL" --socket "$SOCK" "$@" >"$TMP/out" 2>"$TMP/err"
    local rc=$?
    if [ "$rc" != "$want" ]; then
        bad "kasminactl $* -> rc $rc, expected $want"
        sed 's/^/    /' "$TMP/err" "$TMP/out" | head -20
    fi
}

# jq-like checks with Debian's python: jcheck 'PYTHON EXPRESSION over j' (j = the JSON output).
jcheck() {
    if ! "$PY" -c "import json,sys; j=json.load(open('$TMP/out')); sys.exit(0 if ($1) else 1)"; then
        bad "json check failed: $1"
        head -c 2000 "$TMP/out" | sed 's/^/    /'
    fi
}

# Start the daemon.
"$KASMINAD" --listen "unix:$SOCK" --no-persist --cpu-devices 2 --log-level warn 2>"$TMP/kasminad.log" &
pid=$!
for _ in $(seq 1 100); do
    "$CTL" --socket "$SOCK" health >/dev/null 2>&1 && break
    sleep 0.1
done

# --help everywhere (no daemon needed, exit 0, a usage line).
"$CTL" --help | grep -q "Exit codes" || bad "kasminactl --help has no exit code table"
for cmd in info health models create delete germinate advance prune schedule-prune set-alpha \
    set-alpha-target step metrics slots forward fused-forward evaluate load-weights \
    export-weights move stats empty-cache events train training checkpoint; do
    out=$("$CTL" "$cmd" --help) || bad "$cmd --help exits $?"
    case "$out" in "usage: kasminactl $cmd"*) ;; *) bad "$cmd --help: $out" ;; esac
done
ctl 2 no-such-command
ctl 2 germinate m1
ctl 2 set-alpha m1 r0c1 not-a-number
ctl 2 advance m1 r0c1 --to shadowing

# Server.
ctl 0 health
grep -q SERVING "$TMP/out" || bad "health: $(cat "$TMP/out")"
ctl 0 info
grep -q kasminad "$TMP/out" || bad "info: no server name"
ctl 0 --json info
jcheck "j['name'] == 'kasminad' and len(j['devices']) >= 2 and 'conv_light' in j['cnn_blueprints']"

# Models.
ctl 0 --json create m1 --cnn --classes 10 --channels 8 --permissive --init-seed 1
jcheck "j['model_id'] == 'm1' and j['topology'] == 'cnn' and len(j['slots']) >= 2"
S0=$("$PY" -c "import json; print(json.load(open('$TMP/out'))['slots'][0]['slot_id'])")
S1=$("$PY" -c "import json; print(json.load(open('$TMP/out'))['slots'][1]['slot_id'])")
ctl 5 create m1 --permissive
ctl 0 models
grep -q "^m1 " "$TMP/out" || bad "models: no m1 row"
ctl 0 models m1
grep -q "$S0" "$TMP/out" || bad "models m1: no slot table"
ctl 4 models nope
ctl 0 --json models
jcheck "[m['model_id'] for m in j['models']] == ['m1']"

# Lifecycle to FOSSILIZED.
ctl 0 germinate m1 "$S0" conv_light --init-seed 7
grep -q GERMINATED "$TMP/out" || bad "germinate: $(cat "$TMP/out")"
ctl 3 germinate m1 r9c9 conv_light
ctl 5 germinate m1 "$S0" conv_light
ctl 0 advance m1 "$S0"
grep -q "gate G1: passed" "$TMP/out" || bad "advance: $(cat "$TMP/out")"
# A gate that fails: the checks with their numbers, exit 9 unless --allow-fail.
ctl 9 advance m1 "$S0"
grep -q "gate G2: FAILED" "$TMP/out" || bad "failed advance: $(cat "$TMP/out")"
grep -q "^  - insufficient_training_0_of_10: epochs_in_current_stage 0 < 10$" "$TMP/out" ||
    bad "failed advance: no check with value and threshold: $(cat "$TMP/out")"
grep -q "gate G2 failed; the seed stays in TRAINING" "$TMP/err" || bad "advance: $(cat "$TMP/err")"
ctl 9 --json advance m1 "$S0"
jcheck "not j['gate']['passed'] and [c['detail'] for c in j['gate']['checks'] if c['name'] == 'insufficient_training_0_of_10'] == ['epochs_in_current_stage 0 < 10']"
ctl 0 advance m1 "$S0" --allow-fail
grep -q "gate G2: FAILED" "$TMP/out" || bad "advance --allow-fail: $(cat "$TMP/out")"
# An accepted value that looks wrong: the daemon's warning on stderr.
ctl 0 metrics m1 "$S0" --val-accuracy 0.5
grep -q "^kasminactl metrics: warning: val_accuracy 0.5 looks like a fraction" "$TMP/err" ||
    bad "metrics 0.5: no warning: $(cat "$TMP/err")"
for i in 0 1 2 3 4 5 6 7 8 9; do
    ctl 0 metrics m1 "$S0" --val-accuracy "5$i" --gradient-health 0.9 --exploding false
done
ctl 0 --json advance m1 "$S0"
jcheck "j['gate']['passed'] and j['slot']['stage'] == 'BLENDING'"
for i in $(seq 1 10); do ctl 0 step m1 "$S0"; done
ctl 0 --json set-alpha-target m1 "$S0" 1 --steps 2 --curve cosine
jcheck "'accepted' in j"
for i in 1 2 3; do ctl 0 step m1 "$S0"; done
ctl 0 --json slots m1 "$S0"
jcheck "abs(j['slots'][0]['controller']['alpha'] - 1) < 1e-6"
ctl 0 advance m1 "$S0" --to holding
grep -q HOLDING "$TMP/out" || bad "advance --to holding: $(cat "$TMP/out")"
ctl 0 metrics m1 "$S0" --counterfactual 2
ctl 0 --json advance m1 "$S0"
jcheck "j['slot']['stage'] == 'FOSSILIZED'"
ctl 0 --json slots m1
jcheck "len(j['slots']) >= 2 and j['slots'][0]['stage'] == 'FOSSILIZED'"

# Second seed: set-alpha, schedule-prune, prune.
ctl 0 germinate m1 "$S1" conv_light --init-seed 9
ctl 0 --json set-alpha m1 "$S1" 0.5
jcheck "abs(j['controller']['alpha'] - 0.5) < 1e-6"
ctl 0 schedule-prune m1 "$S1" --steps 3 --curve linear --reason test
ctl 0 --json prune m1 "$S1" --reason test --initiator ci
jcheck "'accepted' in j"
ctl 0 step m1

# Compute: a safetensors input made with numpy.
"$PY" - "$TMP" <<'PYEOF'
import json, struct, sys
import numpy as np
d = sys.argv[1]
x = (np.sin(np.arange(4 * 3 * 32 * 32) * 0.37) * 0.5).astype("<f4").reshape(4, 3, 32, 32)
y = (np.arange(4) % 10).astype("<i8")
def save(path, tensors):
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = a.tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[a.dtype.name],
                        "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
save(d + "/x.safetensors", {"input": x})
save(d + "/batch.safetensors", {"input": x, "targets": y})
PYEOF
ctl 0 forward m1 --input "$TMP/x.safetensors"
grep -q "argmax" "$TMP/out" || bad "forward: $(cat "$TMP/out")"
ctl 0 --json forward m1 --input "$TMP/x.safetensors" --output "$TMP/out.safetensors"
jcheck "j['output_file'].endswith('out.safetensors') and j['model_generation'] > 0"
[ -s "$TMP/out.safetensors" ] || bad "forward --output wrote nothing"
ctl 0 --json forward m1 --input "$TMP/x.safetensors:input"
jcheck "j['output']['shape'] == [4, 10] and len(j['output']['data']) == 40"
ctl 0 --json fused-forward m1 --input "$TMP/x.safetensors" --override "$S0=1,1,0,0"
jcheck "j['output']['shape'] == [4, 10]"
ctl 3 fused-forward m1 --input "$TMP/x.safetensors" --override "$S0=1,0"
ctl 0 evaluate m1 --input "$TMP/batch.safetensors" --targets "$TMP/batch.safetensors"
grep -q "^main " "$TMP/out" || bad "evaluate: $(cat "$TMP/out")"
ctl 0 --json evaluate m1 --input "$TMP/batch.safetensors" --targets "$TMP/batch.safetensors:targets" \
    --config main --config "without:$S0=0" --logits "$TMP/logits.safetensors"
jcheck "[r['name'] for r in j['results']] == ['main', 'without'] and j['results'][0]['total'] == 4"
[ -s "$TMP/logits.safetensors" ] || bad "evaluate --logits wrote nothing"
ctl 0 --json evaluate m1 --input "$TMP/batch.safetensors" --targets "$TMP/batch.safetensors" --standard
jcheck "len(j['results']) >= 1"

# Weights.
ctl 0 --json export-weights m1 "$TMP/w.safetensors"
jcheck "j['tensors'] > 0 and j['bytes'] > 0"
ctl 0 --json load-weights m1 "$TMP/w.safetensors" --strict
jcheck "len(j['loaded']) > 0 and j['missing'] == [] and j['unexpected'] == []"
ctl 1 load-weights m1 "$TMP/does-not-exist.safetensors"

# Move, statistics.
ctl 0 --json move m1 --device cpu:1
jcheck "j['device'] == 'cpu:1'"
ctl 0 stats memory
grep -q "cpu:0" "$TMP/out" || bad "stats memory: $(cat "$TMP/out")"
ctl 0 --json stats memory --device cpu:1
jcheck "[d['device'] for d in j['devices']] == ['cpu:1']"
ctl 0 stats cache m1
ctl 0 --json stats cache
jcheck "isinstance(j['caches'], list)"
ctl 2 stats nothing
ctl 0 --json empty-cache
jcheck "len(j['devices']) >= 2"

# Events: the history of m1 (JSON lines), in order.
ctl 0 --json events m1 --idle 300
"$PY" - "$TMP/out" <<'PYEOF' || bad "events: not ordered JSON lines with stage changes"
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
seq = [e["sequence"] for e in ev]
assert ev and seq == sorted(seq) and len(set(seq)) == len(seq), seq
assert sum(e["event_type"] == "SEED_STAGE_CHANGED" for e in ev) >= 4
assert all(e["model_id"] == "m1" for e in ev)
PYEOF
ctl 0 events m1 --count 2
[ "$(grep -c '^ *[0-9]' "$TMP/out")" = 2 ] || bad "events --count 2: $(cat "$TMP/out")"
ctl 0 events m1 --idle 300
grep -q "G2 failed" "$TMP/out" &&
    grep -q "^ *- insufficient_training_0_of_10: epochs_in_current_stage 0 < 10$" "$TMP/out" ||
    bad "events: no gate checks in the text output: $(cat "$TMP/out")"
timeout 1 "$CTL" --socket "$SOCK" events --follow >/dev/null 2>&1
[ $? = 124 ] || bad "events --follow returned before it was interrupted"

# Delete, then the exit codes of the other classes.
ctl 0 delete m1
ctl 4 delete m1
"$CTL" --socket "$TMP/nobody.sock" --deadline 1000 info >/dev/null 2>&1
[ $? = 6 ] || bad "no daemon: expected exit 6"

kill -TERM "$pid"
wait "$pid"
rc=$?
pid=
[ $rc = 0 ] || bad "kasminad exited $rc on SIGTERM"
if [ $fail != 0 ]; then
    echo "--- kasminad log"
    tail -20 "$TMP/kasminad.log"
    exit 1
fi
echo "kasminactl: all checks passed"
