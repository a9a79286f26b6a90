#!/usr/bin/python3
"""Hostile input against a real kasminad with a real --state-dir (issue 12's findings).

Usage: test_hostile.py <kasminad> <dir with the generated kasmina_pb2.py and health_pb2.py>

1. text: every `string` field of every request message of the contract (found by walking the
   service's descriptors: nested messages, repeated fields, map keys and values included) is sent
   once with bytes that are not UTF-8 and once with an embedded NUL, through a byte-level client
   (protobuf-c checks neither). Each answer is INVALID_ARGUMENT naming the field; the model's
   generation, reports and weights are unchanged, an all-models WatchEvents stream keeps
   streaming, and a restart restores every model.
2. ids: model ids ".", "..", ".hidden", "-rf", "a/b", ... are refused with INVALID_ARGUMENT;
   "a\\0b" and a slot id "r0c1\\0zz" too (not cut at the NUL); accepted ids survive a restart.
3. race: StepEpoch racing DeleteModel/CreateModel of the same id answers OK or NOT_FOUND, never
   INTERNAL, and the state directory restores afterwards.
4. values: a counterfactual of 1.7e308 then -1.7e308 (velocity -inf) is refused and the velocity
   is the same after a restart.
5. strict LoadWeights refuses __metadata__ state for a slot the model does not have.
"""
import os
import struct
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
    def __init__(self, tmp, state, *extra):
        super().__init__(BIN, os.path.join(tmp, "run", "k.sock"),
                         os.path.join(tmp, "kasminad.log"), "--no-cuda", "--cpu-devices", "1",
                         "--max-message-bytes", "4M", *extra, state_dir=state, socket_tries=400,
                         max_receive=16 << 20, max_send=16 << 20, timeout=20)


SVC = pb.DESCRIPTOR.services_by_name["Kasmina"]


def f32(shape, fill=0.1):
    n = 1
    for s in shape:
        n *= s
    return pb.Tensor(dtype=pb.DTYPE_F32, shape=shape, data=struct.pack("<%df" % n, *([fill] * n)))


CNN = pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=8, in_channels=3)


def create(d, mid, slots=("r0c0", "r0c1")):
    return d.call("CreateModel", pb.CreateModelRequest(model_id=mid, cnn=CNN, slots=list(slots)))


def state_of(d, mid):
    """What must not change: generation, reports (all fields), weights."""
    reps = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id=mid))
    w = d.call("ExportWeights", pb.ExportWeightsRequest(model_id=mid))
    gen = d.call("GetModel", pb.GetModelRequest(model_id=mid)).generation
    return gen, [r.SerializeToString(deterministic=True) for r in reps.slots], w.safetensors


# ---- 1. every string field ----

def string_paths(desc, prefix=(), depth=0, seen=()):
    """(path of field descriptors) for every string field reachable from message desc."""
    out = []
    if depth > 4 or desc.full_name in seen:
        return out
    for f in desc.fields:
        if f.type == f.TYPE_STRING:
            out.append(prefix + (f,))
        elif f.type == f.TYPE_MESSAGE:
            out += string_paths(f.message_type, prefix + (f,), depth + 1,
                                seen + (desc.full_name,))
    return out


MARK = b"QZXQZXQZ"  # placeholder: 8 bytes that occur nowhere else in a serialized request


def fill(msg, path):
    """Sets the field at path in msg to MARK (creating the messages on the way; a map would be a
    repeated entry message with key and value fields, so the same walk covers it)."""
    f = path[0]
    if len(path) == 1:
        if f.label == f.LABEL_REPEATED:
            getattr(msg, f.name).append(MARK.decode())
        else:
            setattr(msg, f.name, MARK.decode())
    elif f.message_type.GetOptions().map_entry:
        m, sub = getattr(msg, f.name), path[1]
        key_f, val_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        if sub is key_f:
            key = MARK.decode()
        else:
            key = "k" if key_f.type == key_f.TYPE_STRING else 1
        if val_f.type == val_f.TYPE_MESSAGE:
            entry = m[key]
            if sub is key_f:
                entry.SetInParent()
            else:
                fill(entry, path[2:])
        elif sub is val_f:
            m[key] = MARK.decode()
        else:
            m[key] = val_f.default_value
    elif f.label == f.LABEL_REPEATED:
        fill(getattr(msg, f.name).add(), path[1:])
    else:
        fill(getattr(msg, f.name), path[1:])


def path_name(path):
    return ".".join(f.name for f in path)


def test_text(d, tmp):
    create(d, "m1")
    d.call("Germinate", pb.GerminateRequest(model_id="m1", slot_id="r0c0", blueprint_id="norm"))
    before = state_of(d, "m1")
    events = []
    w = d.ch.unary_stream("/kasmina.v1.Kasmina/WatchEvents",
                          request_serializer=pb.WatchEventsRequest.SerializeToString,
                          response_deserializer=pb.LifecycleEvent.FromString)
    sub = w(pb.WatchEventsRequest())
    sub.initial_metadata()
    def listen():
        try:
            for e in sub:
                events.append(e)
        except grpc.RpcError as e:
            events.append(e)

    th = threading.Thread(target=listen, daemon=True)
    th.start()

    bad = {"not UTF-8": b"x\xff\xfe" + MARK[3:], "NUL": b"a\x00b" + MARK[3:],
           "surrogate": b"\xed\xa0\x80" + MARK[3:], "overlong": b"\xc0\xaf" + MARK[2:],
           "cut": b"ab\xe2\x82"+ MARK[4:]}
    n_fields = 0
    for m in SVC.methods:
        in_desc = m.input_type
        cls = getattr(pb, in_desc.name)
        for path in string_paths(in_desc):
            n_fields += 1
            msg = cls()
            fill(msg, path)
            wire = msg.SerializeToString()
            if not check(wire.count(MARK) == 1, "%s.%s: placeholder not found once" %
                         (m.name, path_name(path))):
                continue
            leaf = path[-1].name
            for what, b in bad.items():
                data = wire.replace(MARK, b)
                if m.server_streaming:
                    try:
                        for _ in d.ch.unary_stream("/kasmina.v1.Kasmina/" + m.name,
                                                   request_serializer=lambda x: x,
                                                   response_deserializer=pb.LifecycleEvent.FromString)(
                                data, timeout=5):
                            break
                        code, det = SC.OK, ""
                    except grpc.RpcError as e:
                        code, det = e.code(), e.details() or ""
                else:
                    code, det = d.code(m.name, None, raw=data)
                check(code == SC.INVALID_ARGUMENT and leaf in det and
                      ("UTF-8" in det or "NUL" in det),
                      "%s %s (%s): %s %r" % (m.name, path_name(path), what, code, det))
    # The health service's one string.
    hc = d.ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda x: x,
                          response_deserializer=health_pb2.HealthCheckResponse.FromString)
    try:
        hc(health_pb2.HealthCheckRequest(service="Q").SerializeToString().replace(b"Q", b"\xff"),
           timeout=5)
        code = SC.OK
    except grpc.RpcError as e:
        code = e.code()
    check(code == SC.INVALID_ARGUMENT, "Health/Check service not UTF-8: %s" % code)
    check(n_fields >= 40, "only %d string fields found in the contract" % n_fields)
    print("text: %d string fields x %d kinds of bad text refused" % (n_fields, len(bad)),
          flush=True)

    # Nothing changed; the all-models event stream still streams (a valid prune reaches it).
    check(state_of(d, "m1") == before, "model m1 changed after the bad requests")
    d.call("Prune", pb.PruneRequest(model_id="m1", slot_id="r0c0", reason="ünïcode ok",
                                    initiator="test"))
    for _ in range(100):
        if events:
            break
        time.sleep(0.05)
    check(len(events) > 0 and isinstance(events[-1], pb.LifecycleEvent) and th.is_alive(),
          "WatchEvents stopped streaming: %r" % events[-1:])
    reps = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id="m1"))
    check(len(reps.slots) == 2, "GetSlotReports after a UTF-8 prune reason")
    sub.cancel()


# ---- 2. ids ----

def test_ids(d):
    for mid in [".", "..", ".hidden", "-rf", "a/b", "a b", "a\\b", "x" * 65, "é"]:
        code, det = d.code("CreateModel", pb.CreateModelRequest(model_id=mid, cnn=CNN))
        check(code == SC.INVALID_ARGUMENT and "model_id" in det,
              "CreateModel %r: %s %r" % (mid, code, det))
    # NUL inside an id: the daemon must not act on "a".
    wire = pb.CreateModelRequest(model_id="aQb", cnn=CNN).SerializeToString()
    code, det = d.code("CreateModel", None, raw=wire.replace(b"aQb", b"a\x00b"))
    check(code == SC.INVALID_ARGUMENT and "NUL" in det, "CreateModel a\\0b: %s %r" % (code, det))
    check(d.code("GetModel", pb.GetModelRequest(model_id="a"))[0] == SC.NOT_FOUND,
          "a\\0b created model 'a'")
    before = state_of(d, "m1")
    wire = pb.GerminateRequest(model_id="m1", slot_id="r0c1QQQ",
                               blueprint_id="norm").SerializeToString()
    code, det = d.code("Germinate", None, raw=wire.replace(b"r0c1QQQ", b"r0c1\x00zz"))
    check(code == SC.INVALID_ARGUMENT and "slot_id" in det, "slot r0c1\\0zz: %s %r" % (code, det))
    check(state_of(d, "m1") == before, "Germinate r0c1\\0zz changed the model")
    for mid in ["ok_1", "_under", "a.b-c_d", "Z" * 64]:
        code, det = d.code("CreateModel", pb.CreateModelRequest(model_id=mid, cnn=CNN))
        check(code == SC.OK, "CreateModel %r: %s %r" % (mid, code, det))


# ---- 3. race ----

def test_race(d):
    create(d, "race")
    stop = time.time() + 4.0
    codes = {}
    lock = threading.Lock()

    def stepper():
        while time.time() < stop:
            c, det = d.code("StepEpoch", pb.StepEpochRequest(model_id="race"))
            with lock:
                codes[c] = codes.get(c, 0) + 1
                if c not in (SC.OK, SC.NOT_FOUND):
                    codes.setdefault("details", det)

    def churner():
        while time.time() < stop:
            d.code("DeleteModel", pb.DeleteModelRequest(model_id="race"))
            d.code("CreateModel", pb.CreateModelRequest(model_id="race", cnn=CNN,
                                                        slots=["r0c0"]))

    ts = [threading.Thread(target=stepper) for _ in range(3)] + [threading.Thread(target=churner)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    n = sum(v for k, v in codes.items() if k != "details")
    print("race: %d StepEpoch calls: %s" % (n, {str(k): v for k, v in codes.items()}), flush=True)
    check(n > 50, "race: too few calls (%d)" % n)
    check(set(k for k in codes if k != "details") <= {SC.OK, SC.NOT_FOUND},
          "race: StepEpoch answered %s" % codes)


# ---- 4. values ----

def test_values(d):
    create(d, "vals")
    d.call("Germinate", pb.GerminateRequest(model_id="vals", slot_id="r0c0", blueprint_id="norm"))
    d.call("RecordMetrics", pb.RecordMetricsRequest(model_id="vals", slot_id="r0c0",
                                                    counterfactual_contribution=1.7e308))
    code, det = d.code("RecordMetrics", pb.RecordMetricsRequest(model_id="vals", slot_id="r0c0",
                                                                counterfactual_contribution=-1.7e308))
    check(code == SC.INVALID_ARGUMENT and "contribution_velocity" in det,
          "counterfactual -1.7e308 after 1.7e308: %s %r" % (code, det))
    r = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id="vals", slot_id="r0c0")).slots[0]
    return r.metrics.contribution_velocity, r.metrics.counterfactual_contribution


# ---- 5. strict LoadWeights ----

def test_strict_load(d):
    create(d, "two", slots=("r0c0", "r0c1"))
    d.call("Germinate", pb.GerminateRequest(model_id="two", slot_id="r0c1", blueprint_id="norm"))
    blob = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="two")).safetensors
    create(d, "one", slots=("r0c0",))
    before = state_of(d, "one")
    code, det = d.code("LoadWeights", pb.LoadWeightsRequest(model_id="one", safetensors=blob,
                                                            strict=True))
    check(code == SC.INVALID_ARGUMENT and "r0c1" in det,
          "strict LoadWeights with state for a missing slot: %s %r" % (code, det))
    check(state_of(d, "one") == before, "refused strict LoadWeights changed the model")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        d = Daemon(tmp, state)
        try:
            test_text(d, tmp)
            test_ids(d)
            test_race(d)
            vel = test_values(d)
            test_strict_load(d)
            models = sorted(m.model_id for m in
                            d.call("ListModels", pb.ListModelsRequest()).models)
            snap = {m: state_of(d, m) for m in models}
        finally:
            rc = d.stop()
        check(rc == 0, "kasminad exited %s" % rc)
        # Restart after every accepted request: every model back, unchanged.
        d = Daemon(tmp, state)
        try:
            models2 = sorted(m.model_id for m in
                             d.call("ListModels", pb.ListModelsRequest()).models)
            check(models2 == models, "after restart: models %s, expected %s" % (models2, models))
            for m in models:
                if m in models2:
                    check(state_of(d, m) == snap[m], "after restart: model %s differs" % m)
            r = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id="vals",
                                                                  slot_id="r0c0")).slots[0]
            check((r.metrics.contribution_velocity, r.metrics.counterfactual_contribution) == vel,
                  "velocity after restart %s, before %s" %
                  ((r.metrics.contribution_velocity, r.metrics.counterfactual_contribution), vel))
        finally:
            d.stop()
        if FAILS:
            print(d.logtext()[-3000:])
    print("%d checks, %d failed" % (CHECKS, len(FAILS)))
    print("%d passed, %d failed" % (CHECKS - len(FAILS), len(FAILS)))
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
