#!/usr/bin/python3
"""Gate results people can act on, warnings on accepted values, and the daemon's log (issue 16,
parts 6 and 7), against a real kasminad started with --log-level debug --log-format json.

Usage: test_gates_logs.py <kasminad> <dir with the generated kasmina_pb2.py and health_pb2.py>

- AdvanceStage's GateResult keeps esper's check strings and adds GateCheck entries: the value
  read and the threshold (seed_not_ready: epochs_in_current_stage 3 < 10); an unmeasured quantity
  has no value. The SEED_GATE_EVALUATED event carries the same.
- A successful reply carries trailing metadata "kasmina-warning" for a val_accuracy that looks
  like a fraction, and for host fields sent as 0 (naming the defaults taken); none otherwise.
- Every line kasminad writes parses as JSON; model create/load/move/delete and every stage
  transition are logged at info, one debug line per call (method, code, latency_ms), failed calls
  at warn with method, code, error and message, rate-limited per method: every failed call is
  either logged or counted in a later "suppressed" line.
"""
import json
import math
import os
import sys
import tempfile
import time

BIN, PYDIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, PYDIR)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
import grpc  # noqa: E402
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402
from kasminad import Kasminad  # noqa: E402

SC = grpc.StatusCode
FAILS = []
CHECKS = 0
WARN_MD = "kasmina-warning"
BURST = 10  # RPC_WARN_BURST: warn lines a method may log at once (docs/logging.md)


def check(cond, what):
    global CHECKS
    CHECKS += 1
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


def with_call(d, method, req):
    """(reply, trailing metadata as a list of (key, value))."""
    reply, call = d.unary(method).with_call(req, timeout=30)
    return reply, [(m.key, m.value) for m in call.trailing_metadata() or ()]


def warnings(md):
    return [v for k, v in md if k == WARN_MD]


def check_gate(g):
    """checks mirrors checks_passed / checks_failed (esper's strings, unchanged)."""
    names_p = [c.name for c in g.checks if c.passed]
    names_f = [c.name for c in g.checks if not c.passed]
    check(names_p == list(g.checks_passed), "passed checks mirror checks_passed: %s" % g)
    check(names_f == list(g.checks_failed), "failed checks mirror checks_failed: %s" % g)
    return {c.name: c for c in g.checks}


def lifecycle(d, mid, slot):
    """Create, germinate, TRAINING, three epochs, a G2 that fails; the gate result."""
    _, md = with_call(d, "CreateModel", pb.CreateModelRequest(
        model_id=mid, cnn=pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=8)))
    w = warnings(md)
    check(w == ["host.cnn fields sent as 0 mean \"default\"; model '%s' took kernel_size=3, "
                "in_channels=3." % mid], "CreateModel names the defaults taken: %s" % w)
    _, md = with_call(d, "CreateModel", pb.CreateModelRequest(
        model_id=mid + "-full", cnn=pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=8,
                                                   kernel_size=3, in_channels=3)))
    check(warnings(md) == [], "every host field given: no warning: %s" % md)
    for extra in ({}, {"cnn": pb.CnnHostSpec()}):
        _, md = with_call(d, "CreateModel", pb.CreateModelRequest(model_id=mid + "-defaults",
                                                                  **extra))
        check(warnings(md) == [], "an absent or empty host spec asks for every default: %s" % md)
        d.call("DeleteModel", pb.DeleteModelRequest(model_id=mid + "-defaults"))
    d.call("Germinate", pb.GerminateRequest(model_id=mid, slot_id=slot, blueprint_id="conv_light"))
    a = d.call("AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=slot,
                                                      target=pb.STAGE_TRAINING))
    check(a.gate.passed and a.slot.stage == pb.STAGE_TRAINING, "G1 passes")
    c = check_gate(a.gate)
    check(c["germinated"].detail == "stage GERMINATED", "G1 detail: %s" % c["germinated"])

    for acc in (50.0, 50.25, 50.25):
        _, md = with_call(d, "RecordMetrics", pb.RecordMetricsRequest(
            model_id=mid, slot_id=slot, val_accuracy=acc))
        check(warnings(md) == [], "val_accuracy %g: no warning" % acc)
    a = d.call("AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=slot))
    g = a.gate
    check(not g.passed and a.slot.stage == pb.STAGE_TRAINING, "G2 fails, the seed stays")
    check(list(g.checks_failed) == ["global_improvement_insufficient_0.25%", "seed_not_ready",
                                    "gradient_stats_never_measured"],
          "esper's check strings unchanged: %s" % list(g.checks_failed))
    c = check_gate(g)
    s = c["seed_not_ready"]
    check(s.quantity == "epochs_in_current_stage" and s.op == ">=" and s.threshold == 10 and
          s.WhichOneof("opt_value") == "value" and s.value == 3 and
          s.detail == "epochs_in_current_stage 3 < 10", "seed_not_ready carries 3 < 10: %s" % s)
    i = c["global_improvement_insufficient_0.25%"]
    check(i.value == 0.25 and i.threshold == 0.5 and
          i.detail == "improvement_since_stage_start 0.25 < 0.5", "improvement detail: %s" % i)
    n = c["gradient_stats_never_measured"]
    check(n.WhichOneof("opt_value") is None and n.threshold == 0.1 and
          "never measured" in n.detail, "unmeasured ratio has no value: %s" % n)
    return g


def main():
    with tempfile.TemporaryDirectory() as tmp:
        log = tmp + "/kasminad.log"
        d = Kasminad(BIN, tmp + "/run/k.sock", log, "--no-cuda", "--no-persist",
                     "--cpu-devices", "2", "--log-level", "debug", "--log-format", "json")
        try:
            mid, slot = "g", "r0c0"
            events = d.watch(model_id=mid, timeout=30)
            g = lifecycle(d, mid, slot)

            # The SEED_GATE_EVALUATED event carries the same checks.
            seen = []
            for ev in events:
                seen.append(ev)
                if ev.event_type == "SEED_GATE_EVALUATED" and not ev.gate.passed:
                    break
            events.cancel()
            ev_checks = {c.name: c.detail for c in seen[-1].gate.checks}
            check(ev_checks == {c.name: c.detail for c in g.checks},
                  "the event's checks equal the reply's: %s" % ev_checks)

            # A fraction where a percentage is taken: accepted, with a warning.
            r, md = with_call(d, "RecordMetrics", pb.RecordMetricsRequest(
                model_id=mid, slot_id=slot, val_accuracy=0.87))
            w = warnings(md)
            check(r.metrics.current_val_accuracy == 0.87, "the value is recorded as given")
            check(len(w) == 1 and w[0].startswith("val_accuracy 0.87 looks like a fraction") and
                  "send 87 for a fraction of 0.87" in w[0], "fraction warning: %s" % w)

            # Weights, move, delete: info lines.
            ex = d.call("ExportWeights", pb.ExportWeightsRequest(model_id=mid))
            d.call("LoadWeights", pb.LoadWeightsRequest(model_id=mid, safetensors=ex.safetensors,
                                                        strict=True))
            d.call("MoveModel", pb.MoveModelRequest(model_id=mid, device="cpu:1"))
            d.call("Prune", pb.PruneRequest(model_id=mid, slot_id=slot, reason="test_reason"))
            d.call("DeleteModel", pb.DeleteModelRequest(model_id=mid + "-full"))

            # A client that keeps failing: every failure logged or counted.
            fails = 25
            t0 = time.monotonic()
            for _ in range(fails):
                check(d.code("GetModel", pb.GetModelRequest(model_id="nope"))[0] == SC.NOT_FOUND,
                      "GetModel nope")
            burst_s = time.monotonic() - t0
            time.sleep(1.2)  # at least one token back (1 a second)
            check(d.code("GetModel", pb.GetModelRequest(model_id="nope"))[0] == SC.NOT_FOUND,
                  "GetModel nope after the pause")
            fails += 1
            check(d.stop() == 0, "kasminad exits 0")
        finally:
            d.kill()

        lines = [ln for ln in open(log, encoding="utf-8").read().split("\n") if ln]
        objs = []
        for ln in lines:
            try:
                objs.append(json.loads(ln))
            except ValueError:
                check(False, "a log line is not JSON: %r" % ln)
        check(len(objs) > 20, "kasminad logged %d lines" % len(objs))
        for o in objs:
            check(set(("ts", "level", "module", "msg")) <= set(o) and
                  o["level"] in ("error", "warn", "info", "debug"), "line shape: %s" % o)

        def find(level, module, *words):
            return [o for o in objs if o["level"] == level and o["module"] == module and
                    all(w in o["msg"] for w in words)]

        check(find("info", "service", "model g created", "cnn host"), "create logged")
        check(find("info", "service", "model g: weights loaded", "strict"), "load logged")
        check(find("info", "service", "model g moved", "on cpu:1"), "move logged")
        check(find("info", "service", "model g-full deleted"), "delete logged")
        check(find("info", "lifecycle", "model g slot r0c0", "germinated (blueprint conv_light)"),
              "germination logged")
        check(find("info", "lifecycle", "GERMINATED -> TRAINING"), "GERMINATED -> TRAINING logged")
        check(find("info", "lifecycle", "TRAINING -> PRUNED"), "TRAINING -> PRUNED logged")
        check(find("info", "lifecycle", "pruned by", "test_reason"), "prune reason logged")
        check(find("debug", "lifecycle", "gate G2 for BLENDING failed",
                   "seed_not_ready: epochs_in_current_stage 3 < 10"), "failed gate at debug")
        warn = [o for o in objs if o["level"] == "warn" and o.get("method") == "RecordMetrics"]
        check(len(warn) == 1 and "looks like a fraction" in warn[0].get("warning", ""),
              "the fraction warning is logged: %s" % warn)
        info = [o for o in objs if o["level"] == "info" and o.get("method") == "CreateModel"]
        check(len(info) == 1 and "took kernel_size=3" in info[0]["msg"], "defaults logged: %s" % info)

        # One debug line per call, with method, status and latency.
        calls = [o for o in objs if o["level"] == "debug" and o["module"] == "rpc"]
        adv = [o for o in calls if o.get("method") == "AdvanceStage"]
        check(len(adv) == 2 and all(o.get("code") == "OK" for o in adv), "AdvanceStage lines")
        check(all(isinstance(o.get("latency_ms"), float) and o["latency_ms"] >= 0 and
                  math.isfinite(o["latency_ms"]) for o in calls), "latency_ms on every call line")
        gm = [o for o in calls if o.get("method") == "GetModel"]
        check(len(gm) == fails and all(o["code"] == "NOT_FOUND" for o in gm),
              "a debug line for each of the %d failed calls (%d)" % (fails, len(gm)))

        failed = [o for o in objs if o["level"] == "warn" and o.get("method") == "GetModel" and
                  "failed" in o["msg"]]
        suppressed = [o for o in objs if o["level"] == "warn" and o.get("method") == "GetModel" and
                      "suppressed" in o]
        check(all(o["code"] == "NOT_FOUND" and o["error"] == "KSM_ENOMODEL" and
                  "model_id 'nope' does not exist" in o["msg"] for o in failed),
              "a failed call's line has method, status, error and message: %s" % failed[:1])
        # Rate-limited: the burst, plus one a second of the time the loop took, plus the last.
        bound = BURST + math.ceil(burst_s) + 1
        check(min(fails, BURST) <= len(failed) <= bound,
              "%d warn lines for %d failures (bound %d)" % (len(failed), fails, bound))
        n_sup = sum(int(o["suppressed"]) for o in suppressed)
        check(len(failed) + n_sup == fails and n_sup > 0,
              "every failure logged or counted: %d logged + %d suppressed of %d"
              % (len(failed), n_sup, fails))
    print("test_gates_logs: %d checks, %d failed" % (CHECKS, len(FAILS)))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
