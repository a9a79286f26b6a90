#!/usr/bin/python3
"""Crash-safe state (docs/weights.md#state-on-disk) against a real kasminad on a real state directory.

Usage: test_persist.py <kasminad> <dir with the generated kasmina_pb2.py and health_pb2.py>

1. restart: mutations through every journalled RPC, SIGTERM, restart on the same --state-dir:
   ListModels, GetSlotReports and ExportWeights of every model are byte-equal.
2. lock: a second kasminad on the same state directory refuses to start and says why.
3. repair: a torn journal tail is dropped (logged with its byte offset) and the state before it
   restored; under --strict-restore, damage in the middle of a journal stops start-up with a
   message naming the file (without it the model is quarantined: test_persist_hostile.py).
4. kill: random lifecycle mutations (germinate, advance, set alpha target, prune, schedule
   prune, set alpha, step, record metrics, load weights, move), kill -9 at random points (some
   between calls, some while a mutation is in flight), restart each time; the state must equal
   the state after the last acknowledged mutation (an in-flight mutation may or may not have
   landed, but nothing else). Env: KASMINA_KILL_MUTATIONS (default 1000), KASMINA_KILLS
   (default 20), KASMINA_KILL_SEED.
5. write failure: with kasminad's RLIMIT_FSIZE lowered to its journal's size (prlimit, SIGXFSZ
   ignored), every journalled mutation and every snapshot (LoadWeights, MoveModel) fails to
   write for real (EFBIG): the call fails with RESOURCE_EXHAUSTED / KSM_ENOSPC (the disk-full
   class: ENOSPC, EDQUOT, EFBIG) naming the failure, the model
   reads back unchanged (no phantom mutation: reports, weights, device, generation, forward
   output) with its journal truncated back, reads keep being served, the same mutation succeeds
   once the disk takes writes again, and a restart restores the last acknowledged state.
"""
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

BIN, PYDIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, PYDIR)
import grpc  # noqa: E402
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402
import health_pb2  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
from kasminad import Kasminad  # noqa: E402

SC = grpc.StatusCode
FAILS = []
CHECKS = 0


def check(cond, what):
    global CHECKS
    CHECKS += 1
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


class Daemon(Kasminad):
    def __init__(self, state, sock, log, extra=(), file_limit=False):
        # file_limit: test_write_failure lowers this daemon's RLIMIT_FSIZE (see ignore_xfsz)
        super().__init__(BIN, sock, log, "--cpu-devices", "2", "--no-cuda", *extra,
                         state_dir=state, log_mode="a", socket_tries=0, ready_timeout=20,
                         max_receive=None, max_send=None, ignore_xfsz=file_limit)


def state_of(d, ids=None):
    """Everything a client can see of the models' state, as bytes."""
    models = d.call("ListModels", pb.ListModelsRequest()).models
    out = {}
    for m in models:
        if ids is not None and m.model_id not in ids:
            continue
        info = pb.Model()
        info.CopyFrom(m)
        info.resident_bytes = 0  # allocator accounting, not state
        rep = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id=m.model_id))
        w = d.call("ExportWeights", pb.ExportWeightsRequest(model_id=m.model_id)).safetensors
        out[m.model_id] = (info.SerializeToString(deterministic=True),
                           rep.SerializeToString(deterministic=True), w)
    return out


def describe_diff(a, b):
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            return "model %s only on one side" % k
        for part, x, y in zip(("model", "reports", "weights"), a[k], b[k]):
            if x != y:
                return "model %s: %s differ" % (k, part)
    return "equal"


CNN = pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=4, in_channels=3)
BPS = ["conv_light", "conv_heavy", "norm", "attention", "depthwise", "bottleneck"]


def mutations_for(rng, mid, slots, blob):
    s = rng.choice(slots)
    k = rng.random()
    if k < 0.20:
        return "Germinate", pb.GerminateRequest(
            model_id=mid, slot_id=s, blueprint_id=rng.choice(["conv_light", "norm", "depthwise"]),
            blend_algorithm_id=rng.choice(["linear", "sigmoid", "gated"]),
            init_seed=rng.randrange(1 << 30))
    if k < 0.38:
        return "AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=s)
    if k < 0.48:
        return "SetAlphaTarget", pb.SetAlphaTargetRequest(
            model_id=mid, slot_id=s, alpha_target=rng.choice([0.25, 0.5, 1.0]),
            steps=rng.randrange(1, 6), curve=rng.choice([1, 2, 3]))
    if k < 0.54:
        return "Prune", pb.PruneRequest(model_id=mid, slot_id=s, reason="kill-test")
    if k < 0.57:
        return "SchedulePrune", pb.SchedulePruneRequest(model_id=mid, slot_id=s, steps=3,
                                                        reason="kill-test")
    if k < 0.62:
        return "SetAlpha", pb.SetAlphaRequest(model_id=mid, slot_id=s, alpha=rng.random())
    if k < 0.78:
        return "StepEpoch", pb.StepEpochRequest(model_id=mid, slot_id=rng.choice(["", s]))
    if k < 0.95:
        return "RecordMetrics", pb.RecordMetricsRequest(
            model_id=mid, slot_id=s, val_accuracy=rng.uniform(10, 90),
            counterfactual_contribution=rng.uniform(-2, 5), epoch=rng.randrange(100))
    if k < 0.98:
        return "LoadWeights", pb.LoadWeightsRequest(model_id=mid, safetensors=blob, strict=False)
    return "MoveModel", pb.MoveModelRequest(model_id=mid, device=rng.choice(["cpu:0", "cpu:1"]))


def reply_generation(r):
    """The model generation a mutation's reply reports (None for LoadWeights)."""
    if isinstance(r, pb.SlotReport):
        return r.model_generation
    if isinstance(r, pb.Model):
        return r.generation
    if isinstance(r, pb.StepEpochResponse):
        return r.slots[0].model_generation if r.slots else None
    if hasattr(r, "slot"):
        return r.slot.model_generation
    return None


def create_models(d, n):
    slots = {}
    for i in range(n):
        m = d.call("CreateModel", pb.CreateModelRequest(model_id="k%d" % i, cnn=CNN,
                                                        permissive_gates=True, init_seed=7 + i))
        slots[m.model_id] = [s.slot_id for s in m.slots]
    return slots


def test_restart(tmp):
    state, sock, log = tmp + "/state-r", tmp + "/r.sock", tmp + "/restart.log"
    d = Daemon(state, sock, log)
    slots = create_models(d, 2)
    rng = random.Random(5)
    blob = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="k1")).safetensors
    applied = set()
    for _ in range(300):
        mid = rng.choice(sorted(slots))
        method, req = mutations_for(rng, mid, slots[mid], blob)
        try:
            d.call(method, req)
            applied.add(method)
        except grpc.RpcError as e:
            check(e.code() in (SC.FAILED_PRECONDITION, SC.INVALID_ARGUMENT),
                  "restart: %s failed with %s: %s" % (method, e.code(), e.details()))
    d.call("CreateModel", pb.CreateModelRequest(model_id="gone", cnn=CNN))
    d.call("DeleteModel", pb.DeleteModelRequest(model_id="gone"))
    # a transformer's spec, its dropout included (0 is a value, not "unset"), survives too
    d.call("CreateModel", pb.CreateModelRequest(model_id="tf", transformer=pb.TransformerHostSpec(
        vocab_size=13, n_embd=16, n_head=2, n_layer=2, block_size=8, num_segments=2,
        dropout=0.0)))
    before = state_of(d)
    check(d.stop() == 0, "restart: SIGTERM exits 0")
    check(len(applied) >= 9, "restart: every mutation kind was applied (%s)" % sorted(applied))
    d = Daemon(state, sock, log)
    after = state_of(d)
    check(after == before, "restart: state equal after SIGTERM + restart (%s)"
          % describe_diff(before, after))
    check(list(after) == ["k0", "k1", "tf"],
          "restart: models in creation order, deleted one gone (%s)" % list(after))
    t = d.call("GetModel", pb.GetModelRequest(model_id="tf")).transformer
    check(t.HasField("dropout") and t.dropout == 0.0 and t.n_embd == 16,
          "restart: the transformer's spec (dropout 0) came back as %s" % t)
    # 2. a second daemon on the same state directory (another socket) refuses to start
    p = subprocess.run([BIN, "--listen", "unix:" + tmp + "/second.sock", "--state-dir", state,
                        "--no-cuda"], capture_output=True, text=True, timeout=30)
    check(p.returncode != 0 and "in use by another kasminad (pid %d)" % d.p.pid in p.stderr,
          "lock: second daemon refuses with the owner's pid: rc %d %r"
          % (p.returncode, p.stderr[-300:]))
    check(d.stop() == 0, "restart: second SIGTERM exits 0")
    return state, sock, log, before


def test_repair(tmp, state, sock, log, before):
    journal = os.path.join(state, "models", "k0.d", "journal")
    good = open(journal, "rb").read()
    # A torn tail: half a record after the last good one.
    with open(journal, "ab") as f:
        f.write(b"KSMJ" + bytes([200, 0, 0, 0]) + b"\x01" * 30)
    d = Daemon(state, sock, log)
    after = state_of(d)
    check(after == before, "repair: torn tail dropped, state intact (%s)"
          % describe_diff(before, after))
    check(d.stop() == 0, "repair: SIGTERM exits 0")
    text = open(log).read()
    check("dropped a torn tail at byte %d (38 bytes)" % len(good) in text,
          "repair: the torn tail is logged with its offset")
    check(open(journal, "rb").read() == good, "repair: journal truncated to its last good record")
    if len(good) < 200:
        check(False, "repair: journal of k0 too short to damage its middle (%d bytes)" % len(good))
        return
    # Damage in the middle: flip a byte in the first record's payload.
    bad = bytearray(good)
    bad[40] ^= 0x55
    open(journal, "wb").write(bytes(bad))
    p = subprocess.run([BIN, "--listen", "unix:" + sock, "--state-dir", state, "--no-cuda",
                        "--strict-restore"], capture_output=True, text=True, timeout=30)
    check(p.returncode != 0 and journal in p.stderr and "damaged at byte 0" in p.stderr
          and "--strict-restore" in p.stderr,
          "repair: under --strict-restore damage in the middle stops start-up naming the file: "
          "rc %d %r" % (p.returncode, p.stderr[-400:]))
    check(open(journal, "rb").read() == bytes(bad),
          "repair: the refused start left the damaged journal where it was")
    open(journal, "wb").write(good)


def test_kill(tmp):
    n_mut = int(os.environ.get("KASMINA_KILL_MUTATIONS", "1000"))
    n_kills = int(os.environ.get("KASMINA_KILLS", "20"))
    seed = int(os.environ.get("KASMINA_KILL_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    state, sock, log = tmp + "/state-k", tmp + "/k.sock", tmp + "/kill.log"
    # Small journal limit: compactions happen often, so kills land inside them too.
    extra = ("--journal-records", "7")
    d = Daemon(state, sock, log, extra)
    slots = create_models(d, 2)
    blob = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="k0")).safetensors
    expected = state_of(d)
    kill_at = sorted(rng.sample(range(10, n_mut), n_kills))
    acked = refused = kills = lost = phantom = in_doubt_landed = 0
    t0 = time.time()
    i = 0
    while i < n_mut:
        mid = rng.choice(sorted(slots))
        method, req = mutations_for(rng, mid, slots[mid], blob)
        if kills < len(kill_at) and i >= kill_at[kills]:
            in_flight = rng.random() < 0.5
            outcome = {}
            if in_flight:
                # kill -9 while this mutation is on its way / being journalled
                def send():
                    try:
                        outcome["gen"] = reply_generation(d.call(method, req, timeout=10))
                        outcome["ok"] = True
                    except grpc.RpcError as e:
                        outcome["code"] = e.code()
                th = threading.Thread(target=send)
                th.start()
                time.sleep(rng.uniform(0, 0.004))
                d.p.send_signal(signal.SIGKILL)
                th.join()
            else:
                d.p.send_signal(signal.SIGKILL)
            d.p.wait(timeout=30)
            d.ch.close()
            d.log.close()
            kills += 1
            d = Daemon(state, sock, log, extra)
            got = state_of(d)
            others_same = all(got.get(k) == v for k, v in expected.items() if k != mid)
            g_old = pb.Model.FromString(expected[mid][0]).generation
            g_new = pb.Model.FromString(got[mid][0]).generation
            if outcome.get("ok"):
                # acknowledged before the kill: exactly it must be there
                acked += 1
                lost += 1 if g_new < (outcome["gen"] or g_old + 1) else 0
                phantom += 1 if g_new > (outcome["gen"] or g_old + 1) or not others_same else 0
                want = outcome["gen"] or g_old + 1
                check(others_same and g_new == want,
                      "kill %d: acknowledged in-flight %s present (generation %d -> %d)"
                      % (kills, method, g_old, g_new))
                expected = got
            elif got != expected:
                # an unacknowledged in-flight mutation may have landed, but only it: the other
                # model is unchanged and this one's generation moved by exactly one
                ok = in_flight and others_same and g_new == g_old + 1
                if ok:
                    in_doubt_landed += 1
                    expected = got
                else:
                    phantom += 1 if g_new > g_old else 0
                    lost += 1 if g_new < g_old else 0
                check(ok, "kill %d (%s, %s): state after restart differs: %s (generation %d -> %d)"
                      % (kills, "in flight" if in_flight else "between calls", method,
                         describe_diff(expected, got), g_old, g_new))
            i += 1
            continue
        try:
            d.call(method, req)
            acked += 1
            expected[mid] = state_of(d, {mid})[mid]
        except grpc.RpcError as e:
            refused += 1
            check(e.code() in (SC.FAILED_PRECONDITION, SC.INVALID_ARGUMENT),
                  "kill: %s failed with %s: %s" % (method, e.code(), e.details()))
        i += 1
    final = state_of(d)
    check(final == expected, "kill: final state equals the expected state")
    check(d.stop() == 0, "kill: final SIGTERM exits 0")
    dt = time.time() - t0
    print("kill test: seed %d, %d mutations sent (%d acknowledged, %d refused by the lifecycle), "
          "%d kills survived, %d in-flight mutations landed unacknowledged, mutations lost %d, "
          "phantom mutations %d, %.1f s" % (seed, n_mut, acked, refused, kills, in_doubt_landed,
                                           lost, phantom, dt), flush=True)
    check(kills >= min(n_kills, 20) and lost == 0 and phantom == 0, "kill: figures")


def forward(d, mid):
    """The model's output for a fixed input, as floats."""
    n = 2 * 3 * 16 * 16
    x = pb.Tensor(dtype=pb.DTYPE_F32, shape=[2, 3, 16, 16],
                  data=struct.pack("<%df" % n, *[((i * 7) % 11) / 11.0 for i in range(n)]))
    r = d.call("Forward", pb.ForwardRequest(model_id=mid, input=x), timeout=30)
    return struct.unpack("<%df" % (len(r.output.data) // 4), r.output.data)


def generation(st):
    return pb.Model.FromString(st[0]).generation


def last_sequence(d):
    """The number of the last lifecycle event kasminad published: the highest sequence among the
    kept events WatchEvents replays from the start (it then waits: 1 s deadline)."""
    last = 0
    try:
        for ev in d.watch(after=0, timeout=1.0, subscribed=False):
            last = max(last, ev.sequence)
    except grpc.RpcError as e:
        check(e.code() == SC.DEADLINE_EXCEEDED, "WatchEvents replay ends at its deadline (%s)"
              % e.code())
    return last


def test_write_failure(tmp):
    state, sock, log = tmp + "/state-w", tmp + "/w.sock", tmp + "/write.log"
    d = Daemon(state, sock, log, file_limit=True)
    slots = [s.slot_id for s in d.call("CreateModel", pb.CreateModelRequest(
        model_id="w0", cnn=CNN, permissive_gates=True, init_seed=21)).slots]
    d.call("CreateModel", pb.CreateModelRequest(model_id="w1", cnn=CNN, init_seed=22))
    blob = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="w1")).safetensors
    # Acknowledged mutations: the journal holds records after the creation snapshot.
    d.call("Germinate", pb.GerminateRequest(model_id="w0", slot_id=slots[0],
                                            blueprint_id="conv_light", init_seed=3))
    d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="w0", slot_id=slots[0]))
    d.call("RecordMetrics", pb.RecordMetricsRequest(model_id="w0", slot_id=slots[0],
                                                    val_accuracy=40, epoch=1))
    before = state_of(d, {"w0"})["w0"]
    y_before = forward(d, "w0")
    mdir = os.path.join(state, "models", "w0.d")
    journal, snap = os.path.join(mdir, "journal"), os.path.join(mdir, "snapshot.safetensors")
    jsize, snap_bytes = os.path.getsize(journal), open(snap, "rb").read()
    check(jsize > 0, "write failure: the journal has records (%d bytes)" % jsize)

    # RLIMIT_FSIZE: no file of kasminad's may grow past the limit (a write beyond it is cut
    # short, the next one fails with EFBIG). Journalled mutations get 10 bytes more than the
    # journal holds (a torn record is left that the rollback must truncate), snapshots half the
    # current snapshot's size.
    seq_before = last_sequence(d)
    check(seq_before > 0, "write failure: the acknowledged mutations published events (last %d)"
          % seq_before)
    soft, hard = resource.prlimit(d.p.pid, resource.RLIMIT_FSIZE)
    germinate = pb.GerminateRequest(model_id="w0", slot_id=slots[1], blueprint_id="norm",
                                    init_seed=5)
    journalled, snapshotted = jsize + 10, len(snap_bytes) // 2
    failing = [
        ("Germinate", germinate, journalled),  # a dormant slot gets a seed
        ("AdvanceStage", pb.AdvanceStageRequest(model_id="w0", slot_id=slots[0]), journalled),
        ("SetAlpha", pb.SetAlphaRequest(model_id="w0", slot_id=slots[0], alpha=0.75),
         journalled),
        ("StepEpoch", pb.StepEpochRequest(model_id="w0"), journalled),  # every slot
        ("LoadWeights", pb.LoadWeightsRequest(model_id="w0", safetensors=blob, strict=False),
         snapshotted),
        ("MoveModel", pb.MoveModelRequest(model_id="w0", device="cpu:1"), snapshotted),
    ]
    for method, req, limit in failing:
        resource.prlimit(d.p.pid, resource.RLIMIT_FSIZE, (limit, hard))
        try:
            d.call(method, req)
            check(False, "write failure: %s succeeded with the file-size limit" % method)
            continue
        except grpc.RpcError as e:
            md = dict(e.trailing_metadata() or ())
            check(e.code() == SC.RESOURCE_EXHAUSTED and md.get("kasmina-error") == "KSM_ENOSPC"
                  and "model w0 could not be written to disk (File too large)" in e.details()
                  and "not applied" in e.details(),
                  "write failure: %s fails with RESOURCE_EXHAUSTED / KSM_ENOSPC naming the "
                  "failure (%s %s: %s)" % (method, e.code(), md.get("kasmina-error"),
                                           e.details()))
        now = state_of(d, {"w0"})["w0"]
        check(now == before, "write failure: after the failed %s the model reads back unchanged "
              "(%s)" % (method, describe_diff({"w0": before}, {"w0": now})))
        y = forward(d, "w0")
        check(len(y) == len(y_before) and max(abs(a - b) for a, b in zip(y, y_before)) < 1e-5,
              "write failure: after the failed %s the forward output is unchanged" % method)
        check(os.path.getsize(journal) == jsize and open(snap, "rb").read() == snap_bytes
              and sorted(os.listdir(mdir)) == ["journal", "snapshot.safetensors", "spec.json"],
              "write failure: after the failed %s the journal is back to %d bytes (%d), the "
              "snapshot unchanged and no temporary file left (%s)"
              % (method, jsize, os.path.getsize(journal), sorted(os.listdir(mdir))))
    other = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id="w1"))
    check(len(other.slots) > 0, "write failure: reads of another model are served")

    # A rolled-back mutation's events never reach WatchEvents.
    seq_failed = last_sequence(d)
    check(seq_failed == seq_before, "write failure: the failed mutations published no lifecycle "
          "event (last sequence %d before, %d after)" % (seq_before, seq_failed))

    # The failed writes were rolled back, not left the model refusing mutations: with the limit
    # lifted the same mutation succeeds, and it is the last acknowledged state.
    resource.prlimit(d.p.pid, resource.RLIMIT_FSIZE, (soft, hard))
    r = d.call("Germinate", germinate)
    check(last_sequence(d) > seq_before, "write failure: the acknowledged germination published "
          "its events")
    acked = state_of(d, {"w0"})["w0"]
    check(r.model_generation == generation(before) + 1 and acked != before,
          "write failure: the germination succeeds once the disk takes writes (generation %d -> "
          "%d)" % (generation(before), r.model_generation))
    check(d.stop() == 0, "write failure: SIGTERM exits 0")
    text = open(log).read()
    check(text.count("model w0: rolled back to its durable state (generation %d)"
                     % generation(before)) == len(failing),
          "write failure: each failure is logged as rolled back")
    d = Daemon(state, sock, log)
    after = state_of(d, {"w0"})["w0"]
    check(after == acked, "write failure: after a restart the state is the last acknowledged one "
          "(%s)" % describe_diff({"w0": acked}, {"w0": after}))
    check(d.stop() == 0, "write failure: second SIGTERM exits 0")


def main():
    with tempfile.TemporaryDirectory(prefix="ksm-persist-") as tmp:
        t0 = time.time()
        state, sock, log, before = test_restart(tmp)
        test_repair(tmp, state, sock, log, before)
        print("restart/lock/repair: %.1f s" % (time.time() - t0), flush=True)
        t0 = time.time()
        test_write_failure(tmp)
        print("write failure: %.1f s" % (time.time() - t0), flush=True)
        test_kill(tmp)
        if FAILS:
            for name in ("restart.log", "write.log", "kill.log"):
                p = os.path.join(tmp, name)
                if os.path.exists(p):
                    print("---- %s (tail) ----\n%s" % (name, open(p).read()[-3000:]))
    print("%d checks, %d failed" % (CHECKS, len(FAILS)))
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
