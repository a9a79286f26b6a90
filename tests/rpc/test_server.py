#!/usr/bin/python3
"""kasminad over the wire: a real daemon on a temporary Unix socket.

Usage: test_server.py <kasminad> <dir with generated kasmina/v1/kasmina_pb2.py and health_pb2.py>

Checks: every RPC's happy path; a table of bad requests, each with its status code, with the
model's generation and slot reports unchanged afterwards; unknown methods get UNIMPLEMENTED at
once; a second daemon on the same socket refuses to start; expired deadlines; oversized
messages; 16 client threads of mixed RPCs with the event stream matching the replies; graceful
shutdown under load (health flips first, exit 0).
"""
import math
import os
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


def Daemon(tmp, name, *extra):
    return Kasminad(BIN, os.path.join(tmp, name, "k.sock"), os.path.join(tmp, name + ".log"),
                    "--cpu-devices", "2", "--no-cuda", "--no-persist", "--max-message-bytes", "1M",
                    *extra, log_mode="w+")


def rpc(d, method, req, **kw):
    return d.call(method, req, **kw)


def code_of(d, method, req, **kw):
    try:
        rpc(d, method, req, **kw)
        return SC.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def f32(shape, fill=0.1):
    n = 1
    for s in shape:
        n *= s
    return pb.Tensor(dtype=pb.DTYPE_F32, shape=shape, data=struct.pack("<%df" % n, *([fill] * n)))


def i64(vals, shape=None):
    return pb.Tensor(dtype=pb.DTYPE_I64, shape=shape or [len(vals)],
                     data=struct.pack("<%dq" % len(vals), *vals))


SMALL_CNN = pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=8, in_channels=3)
X = f32([2, 3, 8, 8])


def watch(d, model_id="", after=0):
    return d.watch(model_id, after)  # subscribed once the server's metadata arrives


def collect(call, out, stop_after=None):
    try:
        for ev in call:
            out.append(ev)
            if stop_after is not None and len(out) >= stop_after:
                break
    except grpc.RpcError:
        pass


def happy_paths(d):
    info = rpc(d, "GetServerInfo", pb.GetServerInfoRequest())
    check(info.name == "kasminad" and info.ready, "ServerInfo name/ready")
    check(len(info.devices) == 2 and info.devices[0].name == "cpu:0", "ServerInfo devices")
    check(len(info.cnn_blueprints) > 0, "ServerInfo lists CNN blueprints")
    bp = "conv_light" if "conv_light" in info.cnn_blueprints else info.cnn_blueprints[0]
    check(d.health() == health_pb2.HealthCheckResponse.SERVING, "health SERVING")
    check(d.health("kasmina.v1.Kasmina") == health_pb2.HealthCheckResponse.SERVING,
          "health SERVING for the service")
    try:
        d.health("nope")
        check(False, "unknown health service must fail")
    except grpc.RpcError as e:
        check(e.code() == SC.NOT_FOUND, "unknown health service NOT_FOUND")

    events = []
    wcall = watch(d, "m1")
    wt = threading.Thread(target=collect, args=(wcall, events), daemon=True)
    wt.start()

    m = rpc(d, "CreateModel", pb.CreateModelRequest(model_id="m1", cnn=SMALL_CNN,
                                                     permissive_gates=True, init_seed=1))
    check(m.model_id == "m1" and len(m.slots) > 0, "CreateModel reply")
    slot = m.slots[0].slot_id
    check(rpc(d, "GetModel", pb.GetModelRequest(model_id="m1")).model_id == "m1", "GetModel")
    ids = [x.model_id for x in rpc(d, "ListModels", pb.ListModelsRequest()).models]
    check("m1" in ids and "demo" in ids, "ListModels has m1 and demo: %s" % ids)
    reps = rpc(d, "GetSlotReports", pb.GetSlotReportsRequest(model_id="m1")).slots
    check(len(reps) == len(m.slots) and not reps[0].occupied, "GetSlotReports empty slots")

    r = rpc(d, "Germinate", pb.GerminateRequest(model_id="m1", slot_id=slot, blueprint_id=bp))
    check(r.occupied and r.stage == pb.STAGE_GERMINATED, "Germinate -> GERMINATED")
    a = rpc(d, "AdvanceStage", pb.AdvanceStageRequest(model_id="m1", slot_id=slot))
    check(a.slot.stage == pb.STAGE_TRAINING, "AdvanceStage -> TRAINING (%d)" % a.slot.stage)
    r = rpc(d, "RecordMetrics", pb.RecordMetricsRequest(model_id="m1", slot_id=slot,
                                                        val_accuracy=50.0))
    check(r.metrics.current_val_accuracy == 50.0, "RecordMetrics")
    st = rpc(d, "StepEpoch", pb.StepEpochRequest(model_id="m1"))
    check(len(st.slots) == len(m.slots), "StepEpoch reports every slot")
    r = rpc(d, "SetAlpha", pb.SetAlphaRequest(model_id="m1", slot_id=slot, alpha=0.5))
    check(abs(r.controller.alpha - 0.5) < 1e-6, "SetAlpha")
    c, msg = code_of(d, "SetAlphaTarget", pb.SetAlphaTargetRequest(model_id="m1", slot_id=slot,
                                                                    alpha_target=1.0, steps=3))
    check(c in (SC.OK, SC.FAILED_PRECONDITION), "SetAlphaTarget in TRAINING: %s %s" % (c, msg))

    fw = rpc(d, "Forward", pb.ForwardRequest(model_id="m1", input=X))
    check(list(fw.output.shape) == [2, 4] and len(fw.output.data) == 32, "Forward output [2,4]")
    fw16 = rpc(d, "Forward", pb.ForwardRequest(model_id="m1", input=X, output_dtype=pb.DTYPE_BF16))
    check(fw16.output.dtype == pb.DTYPE_BF16 and len(fw16.output.data) == 16, "Forward bf16")
    ff = rpc(d, "FusedForward", pb.FusedForwardRequest(
        model_id="m1", input=X, overrides=[pb.AlphaOverride(slot_id=slot, alpha=[0.0, 1.0])]))
    check(list(ff.output.shape) == [2, 4], "FusedForward")
    ev = rpc(d, "Evaluate", pb.EvaluateRequest(model_id="m1", input=X, targets=i64([1, 2]),
                                               generate_standard=True))
    check(len(ev.results) >= 1 and ev.results[0].total > 0, "Evaluate standard configs")
    ev2 = rpc(d, "Evaluate", pb.EvaluateRequest(
        model_id="m1", input=X, targets=i64([1, 2]), return_logits=True,
        configs=[pb.AlphaConfig(name="off", alpha={slot: 0.0})]))
    check(len(ev2.results) == 1 and ev2.results[0].name == "off" and
          len(ev2.results[0].logits.data) == 32, "Evaluate explicit config with logits")

    ex = rpc(d, "ExportWeights", pb.ExportWeightsRequest(model_id="m1"))
    check(len(ex.safetensors) > 8, "ExportWeights")
    lw = rpc(d, "LoadWeights", pb.LoadWeightsRequest(model_id="m1", safetensors=ex.safetensors,
                                                     strict=True))
    check(len(lw.loaded) > 0, "LoadWeights strict round trip")
    mv = rpc(d, "MoveModel", pb.MoveModelRequest(model_id="m1", device="cpu:1"))
    check(mv.device == "cpu:1", "MoveModel to cpu:1")
    fw2 = rpc(d, "Forward", pb.ForwardRequest(model_id="m1", input=X))
    check(fw2.output.data == fw.output.data, "Forward after the move gives the same logits")
    ms = rpc(d, "GetMemoryStats", pb.GetMemoryStatsRequest())
    check(len(ms.devices) == 2, "GetMemoryStats covers both devices")
    check(any("m1" in dv.per_model_bytes for dv in ms.devices), "per-model bytes")
    cs = rpc(d, "GetCacheStats", pb.GetCacheStatsRequest(model_id="m1"))
    check(all(c.model_id == "m1" for c in cs.caches), "GetCacheStats")
    ec = rpc(d, "EmptyCache", pb.EmptyCacheRequest(device="cpu:0"))
    check(len(ec.devices) == 1 and ec.devices[0].device == "cpu:0", "EmptyCache cpu:0")

    c, msg = code_of(d, "SchedulePrune", pb.SchedulePruneRequest(model_id="m1", slot_id=slot,
                                                                  steps=2))
    check(c in (SC.OK, SC.FAILED_PRECONDITION), "SchedulePrune: %s %s" % (c, msg))
    pr = rpc(d, "Prune", pb.PruneRequest(model_id="m1", slot_id=slot, reason="test"))
    check(pr.accepted or pr.slot.stage in (pb.STAGE_PRUNED, pb.STAGE_EMBARGOED), "Prune")

    # The event stream saw the lifecycle in order.
    deadline = time.time() + 5
    while time.time() < deadline and not any(e.event_type == "SEED_PRUNED" for e in events):
        time.sleep(0.05)
    types = [e.event_type for e in events]
    check(types[:1] == ["SEED_GERMINATED"], "first event SEED_GERMINATED: %s" % types)
    check("SEED_PRUNED" in types, "SEED_PRUNED seen: %s" % types)
    seqs = [e.sequence for e in events]
    check(seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "sequences increase")
    check(all(e.model_id == "m1" for e in events), "model filter")
    wcall.cancel()
    # Resume after a sequence replays what followed it.
    if len(seqs) >= 2:
        replay = []
        rc = watch(d, "m1", after=seqs[0])
        collect(rc, replay, stop_after=len(seqs) - 1)
        rc.cancel()
        check([e.sequence for e in replay] == seqs[1:], "resume after_sequence replays the rest")
    return slot, bp


def bad_requests(d, slot, bp):
    """The model m2 has a seed in TRAINING on `slot`; nothing below may change it."""
    rpc(d, "CreateModel", pb.CreateModelRequest(model_id="m2", cnn=SMALL_CNN, permissive_gates=True))
    rpc(d, "Germinate", pb.GerminateRequest(model_id="m2", slot_id=slot, blueprint_id=bp))
    rpc(d, "AdvanceStage", pb.AdvanceStageRequest(model_id="m2", slot_id=slot))
    m = rpc(d, "GetModel", pb.GetModelRequest(model_id="m2"))
    empty_slot = m.slots[1].slot_id
    gen0 = m.generation
    rep0 = rpc(d, "GetSlotReports", pb.GetSlotReportsRequest(model_id="m2")).SerializeToString()
    M, S = "m2", slot
    IA, NF, FP, AE, RE, OOR = (SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.FAILED_PRECONDITION,
                               SC.ALREADY_EXISTS, SC.RESOURCE_EXHAUSTED, SC.OUT_OF_RANGE)
    nan = float("nan")
    G = b"\xff\xff\xff\xff\x0f\x12garbage"
    table = [
        ("Germinate", None, IA, {"raw": G}),
        ("Forward", None, IA, {"raw": G}),
        ("CreateModel", None, IA, {"raw": b"\x0a\x05ab"}),
        ("SetAlpha", None, IA, {"raw": b"\x1d\x00"}),
        ("Forward", pb.ForwardRequest(model_id=M, input=i64([1] * 384, [2, 3, 8, 8])), (IA,), {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=pb.Tensor(shape=[1], data=b"1234")), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=pb.Tensor(dtype=pb.DTYPE_F32, shape=[2, 3, 8, 8], data=b"\0" * 100)), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=pb.Tensor(dtype=pb.DTYPE_F32, shape=[1 << 40, 1 << 40, 3], data=b"")), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=pb.Tensor(dtype=pb.DTYPE_F32, shape=[-1, 3, 8, 8], data=b"")), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=pb.Tensor(dtype=pb.DTYPE_F32, shape=[1] * 7, data=b"\0" * 4)), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=f32([1, 5, 8, 8])), IA, {}),
        ("Forward", pb.ForwardRequest(model_id="nope", input=X), NF, {}),
        ("Forward", pb.ForwardRequest(input=X), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=X, output_dtype=pb.DTYPE_I64), IA, {}),
        ("Forward", pb.ForwardRequest(model_id=M, input=f32([300, 3, 32, 32])), RE, {}),
        ("SetAlpha", pb.SetAlphaRequest(model_id=M, slot_id=S, alpha=nan), IA, {}),
        ("SetAlpha", pb.SetAlphaRequest(model_id=M, slot_id="r9c9", alpha=0.5), IA, {}),
        ("SetAlpha", pb.SetAlphaRequest(model_id=M, alpha=0.5), IA, {}),
        ("SetAlpha", pb.SetAlphaRequest(model_id="nope", slot_id=S, alpha=0.5), NF, {}),
        ("Germinate", pb.GerminateRequest(model_id=M, slot_id=empty_slot, blueprint_id="no_such_bp"), IA, {}),
        ("Germinate", pb.GerminateRequest(model_id=M, slot_id=empty_slot), IA, {}),
        ("Germinate", pb.GerminateRequest(model_id=M, slot_id=S, blueprint_id=bp), FP, {}),
        ("Germinate", pb.GerminateRequest(model_id=M, slot_id=empty_slot, blueprint_id=bp, alpha_target=2.0), IA, {}),
        ("Germinate", pb.GerminateRequest(model_id=M, slot_id=empty_slot, blueprint_id=bp, alpha_target=nan), IA, {}),
        ("Germinate", pb.GerminateRequest(model_id=M, slot_id=empty_slot, blueprint_id=bp, alpha_algorithm=9), IA, {}),
        ("Germinate", pb.GerminateRequest(model_id=M, slot_id="r0c0\x01", blueprint_id=bp), IA, {}),
        ("AdvanceStage", pb.AdvanceStageRequest(model_id=M, slot_id=S, target=5), IA, {}),
        ("AdvanceStage", pb.AdvanceStageRequest(model_id=M, slot_id=S, target=99), IA, {}),
        ("AdvanceStage", pb.AdvanceStageRequest(model_id=M, slot_id="r9c9"), IA, {}),
        ("CreateModel", pb.CreateModelRequest(model_id="demo"), AE, {}),
        ("CreateModel", pb.CreateModelRequest(model_id="a b"), IA, {}),
        ("CreateModel", pb.CreateModelRequest(model_id="x1", dtype=pb.DTYPE_I64), IA, {}),
        ("CreateModel", pb.CreateModelRequest(model_id="x2", auto_forward_gates=[pb.GATE_G0]), IA, {}),
        ("CreateModel", pb.CreateModelRequest(model_id="x3", slots=["r0c0", "r0c0"]), IA, {}),
        ("RecordMetrics", pb.RecordMetricsRequest(model_id=M, slot_id=S, val_accuracy=nan), IA, {}),
        ("RecordMetrics", pb.RecordMetricsRequest(model_id=M, slot_id=S, val_accuracy=150), IA, {}),
        ("RecordMetrics", pb.RecordMetricsRequest(model_id=M, slot_id=S, gradients=pb.GradientStats(gradient_health=2)), IA, {}),
        ("SetAlphaTarget", pb.SetAlphaTargetRequest(model_id=M, slot_id=S, alpha_target=0), IA, {}),
        ("SetAlphaTarget", pb.SetAlphaTargetRequest(model_id=M, slot_id=S, alpha_target=1, curve=9), IA, {}),
        ("SetAlphaTarget", pb.SetAlphaTargetRequest(model_id=M, slot_id=S, alpha_target=1, steepness=math.inf), IA, {}),
        ("SchedulePrune", pb.SchedulePruneRequest(model_id=M, slot_id=S, curve=9), IA, {}),
        ("Prune", pb.PruneRequest(model_id=M), IA, {}),
        ("FusedForward", pb.FusedForwardRequest(model_id=M, input=X, overrides=[pb.AlphaOverride(slot_id=S, alpha=[1.0])]), IA, {}),
        ("FusedForward", pb.FusedForwardRequest(model_id=M, input=X, overrides=[pb.AlphaOverride(slot_id=S, alpha=[1, 1]), pb.AlphaOverride(slot_id=S, alpha=[1, 1])]), IA, {}),
        ("FusedForward", pb.FusedForwardRequest(model_id=M, input=X, overrides=[pb.AlphaOverride(slot_id=S, alpha=[nan, 1])]), IA, {}),
        ("Evaluate", pb.EvaluateRequest(model_id=M, input=X, targets=i64([1, 2])), IA, {}),
        ("Evaluate", pb.EvaluateRequest(model_id=M, input=X, targets=f32([2]), generate_standard=True), IA, {}),
        ("Evaluate", pb.EvaluateRequest(model_id=M, input=X, targets=i64([1, 2]), configs=[pb.AlphaConfig(name="a"), pb.AlphaConfig(name="a")]), IA, {}),
        ("MoveModel", pb.MoveModelRequest(model_id=M, device="cpu:7"), IA, {}),
        ("MoveModel", pb.MoveModelRequest(model_id=M, dtype=42), IA, {}),
        ("LoadWeights", pb.LoadWeightsRequest(model_id=M, safetensors=b"\x08\0\0\0\0\0\0\0{garbage"), IA, {}),
        ("LoadWeights", pb.LoadWeightsRequest(model_id=M), IA, {}),
        ("GetModel", pb.GetModelRequest(model_id="nope"), NF, {}),
        ("DeleteModel", pb.DeleteModelRequest(model_id="nope"), NF, {}),
        ("GetMemoryStats", pb.GetMemoryStatsRequest(device="gpu:9"), IA, {}),
        ("StepEpoch", pb.StepEpochRequest(model_id=M, slot_id="r9c9"), IA, {}),
        ("GetSlotReports", pb.GetSlotReportsRequest(model_id=M, slot_id="r9c9"), IA, {}),
        ("SetAlpha", pb.SetAlphaRequest(model_id=M, slot_id=S, alpha=0.3), SC.DEADLINE_EXCEEDED, {"timeout": -1}),
        ("Forward", pb.ForwardRequest(model_id=M, input=X), SC.DEADLINE_EXCEEDED, {"timeout": -1}),
    ]
    n = 0
    for method, req, want, kw in table:
        want = want if isinstance(want, tuple) else (want,)
        c, msg = code_of(d, method, req, **kw)
        n += 1
        check(c in want, "bad request %d %s: got %s (%s), want %s" % (n, method, c, msg, want))
        if c not in (SC.DEADLINE_EXCEEDED, SC.RESOURCE_EXHAUSTED) and c in want:
            check(msg and msg.endswith(".") and "\n" not in msg,
                  "bad request %d %s: one-sentence message, got %r" % (n, method, msg))
    check(n >= 40, "at least 40 bad requests (%d)" % n)
    # WatchEvents ahead of the last sequence: OUT_OF_RANGE.
    try:
        for _ in watch(d, M, after=1 << 60):
            pass
        check(False, "WatchEvents after a future sequence must fail")
    except grpc.RpcError as e:
        check(e.code() == OOR, "WatchEvents future after_sequence OUT_OF_RANGE: %s" % e.code())
    m = rpc(d, "GetModel", pb.GetModelRequest(model_id="m2"))
    check(m.generation == gen0, "generation unchanged by bad requests (%d -> %d)" % (gen0, m.generation))
    rep1 = rpc(d, "GetSlotReports", pb.GetSlotReportsRequest(model_id="m2")).SerializeToString()
    check(rep1 == rep0, "slot reports unchanged by bad requests")


def unknown_method(d):
    f = d.ch.unary_unary("/kasmina.v1.Kasmina/NoSuchMethod")
    t0 = time.time()
    try:
        f(b"", timeout=5)
        check(False, "unknown method must fail")
    except grpc.RpcError as e:
        dt = time.time() - t0
        check(e.code() == SC.UNIMPLEMENTED, "unknown method UNIMPLEMENTED (%s)" % e.code())
        check(dt < 0.5, "unknown method answered in %.3f s" % dt)


def second_daemon(tmp, d):
    p = subprocess.run([BIN, "--listen", "unix:" + d.sock, "--no-cuda", "--no-persist"],
                       capture_output=True,
                       text=True, timeout=30)
    check(p.returncode != 0, "second daemon on the same socket exits non-zero")
    check("already serving" in p.stderr, "second daemon says why: %r" % p.stderr[-300:])
    check(d.health() == health_pb2.HealthCheckResponse.SERVING, "first daemon still serves")


def concurrency(d, slot, bp, threads=16, seconds=3.0):
    """Each thread owns a model and mixes lifecycle, compute and read RPCs; the event stream of
    every model must show the stage changes in the order the replies saw them."""
    for t in range(threads):
        rpc(d, "CreateModel", pb.CreateModelRequest(model_id="c%d" % t, cnn=SMALL_CNN,
                                                     permissive_gates=True, init_seed=t))
    events = []
    wcall = watch(d)
    wt = threading.Thread(target=collect, args=(wcall, events), daemon=True)
    wt.start()
    errors, stages = [], {}

    def worker(t):
        mid = "c%d" % t
        seen = []
        try:
            r = rpc(d, "Germinate", pb.GerminateRequest(model_id=mid, slot_id=slot, blueprint_id=bp))
            seen.append(r.stage)
            a = rpc(d, "AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=slot))
            seen.append(a.slot.stage)
            gens = []
            end = time.time() + seconds
            k = 0
            while time.time() < end:
                k += 1
                op = k % 6
                if op == 0:
                    gens.append(rpc(d, "SetAlpha", pb.SetAlphaRequest(model_id=mid, slot_id=slot, alpha=(k % 10) / 10)).model_generation)
                elif op == 1:
                    rpc(d, "Forward", pb.ForwardRequest(model_id=mid, input=X))
                elif op == 2:
                    rpc(d, "GetSlotReports", pb.GetSlotReportsRequest(model_id=mid))
                elif op == 3:
                    gens.append(rpc(d, "RecordMetrics", pb.RecordMetricsRequest(model_id=mid, slot_id=slot, val_accuracy=float(k % 100))).model_generation)
                elif op == 4:
                    rpc(d, "GetServerInfo", pb.GetServerInfoRequest())
                else:
                    d.health()
            check(gens == sorted(gens) and len(set(gens)) == len(gens), "%s: generations increase" % mid)
            p = rpc(d, "Prune", pb.PruneRequest(model_id=mid, slot_id=slot, reason="done"))
            seen.append(p.slot.stage)
        except grpc.RpcError as e:
            errors.append("%s: %s %s" % (mid, e.code(), e.details()))
        stages[mid] = seen

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    check(not errors, "16 threads of mixed RPCs without errors: %s" % errors[:3])
    deadline = time.time() + 5
    want = threads
    while time.time() < deadline and len({e.model_id for e in events if e.event_type == "SEED_STAGE_CHANGED" and e.to_stage == pb.STAGE_PRUNED and e.model_id.startswith("c")}) < want:
        time.sleep(0.05)
    wcall.cancel()
    for t in range(threads):
        mid = "c%d" % t
        mine = [e for e in events if e.model_id == mid]
        kinds = [e.event_type for e in mine]
        check(kinds[:1] == ["SEED_GERMINATED"], "%s: events %s" % (mid, kinds))
        to = [e.to_stage for e in mine if e.event_type == "SEED_STAGE_CHANGED"]
        reply_changes = [s for s in stages.get(mid, [])[1:]]
        check(to[:len(reply_changes)] == reply_changes,
              "%s: stage events %s match replies %s" % (mid, to, reply_changes))


def graceful_shutdown(tmp):
    d = Daemon(tmp, "drain", "--demo", "--drain-timeout", "5")
    hw = d.ch.unary_stream("/grpc.health.v1.Health/Watch",
                           request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                           response_deserializer=health_pb2.HealthCheckResponse.FromString)
    hcall = hw(health_pb2.HealthCheckRequest())
    statuses, results = [], []
    ht = threading.Thread(target=collect, args=(hcall, statuses), daemon=True)
    ht.start()
    stop = threading.Event()

    def load():
        while not stop.is_set():
            c, _ = code_of(d, "Forward", pb.ForwardRequest(model_id="demo", input=f32([4, 3, 16, 16])), timeout=10)
            results.append(c)
            if c != SC.OK:
                break

    ths = [threading.Thread(target=load) for _ in range(8)]
    for th in ths:
        th.start()
    time.sleep(1.0)
    d.p.send_signal(signal.SIGTERM)
    rc = d.p.wait(timeout=30)
    stop.set()
    for th in ths:
        th.join(timeout=30)
    ht.join(timeout=5)
    check(rc == 0, "exit 0 after SIGTERM under load (rc %s)" % rc)
    H = health_pb2.HealthCheckResponse
    statuses = [x.status for x in statuses]
    check(statuses[:1] == [H.SERVING] and H.NOT_SERVING in statuses,
          "health Watch saw SERVING then NOT_SERVING: %s" % statuses)
    bad = [c for c in results if c not in (SC.OK, SC.UNAVAILABLE, SC.CANCELLED)]
    check(not bad and results.count(SC.OK) > 0,
          "in-flight calls completed or got UNAVAILABLE: %s" % set(results))
    check(not os.path.exists(d.sock), "socket removed on a clean stop")
    log = d.logtext()
    check("draining" in log and "kasminad stopped" in log, "drain logged")
    d.ch.close()


def slow_subscriber(tmp):
    """A subscriber that stops reading is ended with RESOURCE_EXHAUSTED once it falls more than
    subscriber-buffer events behind; the mutations never wait for it. A subscriber that is ended
    resumes with after_sequence and misses nothing."""
    d = Daemon(tmp, "slow", "--subscriber-buffer", "64")
    try:
        rpc(d, "CreateModel", pb.CreateModelRequest(model_id="s", cnn=SMALL_CNN, slots=["r0c1"]))
        rpc(d, "Germinate", pb.GerminateRequest(model_id="s", slot_id="r0c1",
                                                blueprint_id="conv_small"))
        rpc(d, "AdvanceStage", pb.AdvanceStageRequest(model_id="s", slot_id="r0c1"))
        # Never read until the end, on its own channel without BDP probing so that HTTP/2 flow
        # control (a 64 KiB window) pushes back on the server quickly.
        sch = grpc.insecure_channel("unix:" + d.sock, options=[("grpc.http2.bdp_probe", 0)])
        stalled = sch.unary_stream("/kasmina.v1.Kasmina/WatchEvents",
                                   request_serializer=pb.WatchEventsRequest.SerializeToString,
                                   response_deserializer=pb.LifecycleEvent.FromString)(
            pb.WatchEventsRequest(model_id="s"))
        stalled.initial_metadata()
        seen = set()
        state = {"resumes": 0, "done": False}

        def reader():
            after = 0
            deadline = time.time() + 60
            while not state["done"] and time.time() < deadline:
                call = watch(d, "s", after)
                try:
                    for ev in call:
                        seen.add(ev.sequence)
                        after = max(after, ev.sequence)
                        if state["done"] and after >= state.get("last", 1 << 62):
                            call.cancel()
                            return
                except grpc.RpcError as e:
                    if e.code() == SC.CANCELLED:
                        return
                    state["resumes"] += 1

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        n = 3000                           # each strict G2 refusal emits SEED_GATE_EVALUATED
        t0 = time.time()
        last = 0
        for _ in range(n):
            rpc(d, "AdvanceStage", pb.AdvanceStageRequest(model_id="s", slot_id="r0c1"))
        elapsed = time.time() - t0
        state["last"] = 3 + n              # GERMINATED, GATE, STAGE_CHANGED, then n gate events
        state["done"] = True
        t.join(timeout=60)
        missing = [q for q in range(1, 3 + n + 1) if q not in seen]
        check(not missing, "a resuming subscriber saw every event (%d missing, %d resumes)"
              % (len(missing), state["resumes"]))
        res = {}

        def drain():
            try:
                for _ in stalled:
                    pass
                res["code"] = SC.OK
            except grpc.RpcError as e:
                res["code"] = e.code()
                res["details"] = e.details()

        t2 = threading.Thread(target=drain, daemon=True)
        t2.start()
        t2.join(timeout=30)
        check(res.get("code") == SC.RESOURCE_EXHAUSTED,
              "stalled subscriber ended with RESOURCE_EXHAUSTED (got %s)" % res.get("code"))
        check("subscriber-buffer = 64" in (res.get("details") or ""),
              "the message names the limit: %s" % res.get("details"))
        print("slow subscriber: %d mutations in %.2f s beside a stalled subscriber; "
              "reader resumed %d times" % (n, elapsed, state["resumes"]), flush=True)
        stalled.cancel()
        sch.close()
        check(d.stop() == 0, "slow-subscriber daemon exits 0")
    finally:
        if d.p.poll() is None:
            d.p.kill()


def main():
    tmp = tempfile.mkdtemp(prefix="kasmina-rpc-")
    d = Daemon(tmp, "main", "--demo")
    try:
        st = os.stat(d.sock)
        check(oct(st.st_mode & 0o777) == "0o600", "socket mode 0600")
        check(oct(os.stat(os.path.dirname(d.sock)).st_mode & 0o777) == "0o700", "socket dir 0700")
        unknown_method(d)
        slot, bp = happy_paths(d)
        bad_requests(d, slot, bp)
        second_daemon(tmp, d)
        concurrency(d, slot, bp)
        rc = d.stop()
        check(rc == 0, "exit 0 after SIGTERM (rc %s)" % rc)
    finally:
        if d.p.poll() is None:
            d.p.kill()
    graceful_shutdown(tmp)
    slow_subscriber(tmp)
    if FAILS:
        print("--- kasminad log ---\n" + d.logtext()[-4000:])
        print("rpc_server: %d of %d checks failed" % (len(FAILS), CHECKS))
        sys.exit(1)
    print("rpc_server: %d checks passed" % CHECKS)


main()
