#!/usr/bin/python3
"""Every SeedMetrics and SlotReport field of the contract over the wire, and RecordMetrics'
attribution sums and clear_auto_pruned (issue 16, part 4), against a real kasminad on a real
state directory.

Usage: test_seed_metrics.py <kasminad> <dir with the generated kasmina_pb2.py and health_pb2.py>

- The report carries stage_entered_at_unix_ns (within the call's wall-clock window) and
  previous_epochs_in_stage (the epochs the seed spent in GERMINATED before TRAINING).
- RecordMetrics stores interaction_sum, boost_received, upstream_alpha_sum and
  downstream_alpha_sum as given; a non-finite one is INVALID_ARGUMENT and changes nothing.
- BLENDING records accuracy_at_blending_start (the accuracy when blending began).
- An automatic prune reason ("governor_nan") sets auto_pruned and auto_prune_reason;
  clear_auto_pruned clears the flag.
- use_collected_gradients is FAILED_PRECONDITION: no TrainStep has collected statistics.
- Every field survives a restart.
"""
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


def check(cond, what):
    global CHECKS
    CHECKS += 1
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


CNN = pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=8, in_channels=3)


def report(d, mid, slot):
    return d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id=mid, slot_id=slot)).slots[0]


def metrics(d, mid, slot, **kw):
    return d.call("RecordMetrics", pb.RecordMetricsRequest(model_id=mid, slot_id=slot, **kw))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "state")
        d = Kasminad(BIN, tmp + "/run/k.sock", tmp + "/kasminad.log", "--no-cuda",
                     "--cpu-devices", "1", state_dir=state)
        try:
            d.call("CreateModel", pb.CreateModelRequest(model_id="m", cnn=CNN, slots=["r0c0"],
                                                        permissive_gates=True))
            t0 = time.time_ns()
            d.call("Germinate", pb.GerminateRequest(model_id="m", slot_id="r0c0",
                                                    blueprint_id="norm"))
            t1 = time.time_ns()
            r = report(d, "m", "r0c0")
            check(t0 - 1000 <= r.stage_entered_at_unix_ns <= t1 + 1000,
                  "stage_entered_at_unix_ns %d not in [%d, %d]" % (r.stage_entered_at_unix_ns,
                                                                    t0, t1))
            metrics(d, "m", "r0c0", val_accuracy=40.0)
            d.call("StepEpoch", pb.StepEpochRequest(model_id="m", slot_id="r0c0"))
            metrics(d, "m", "r0c0", val_accuracy=41.0)
            d.call("StepEpoch", pb.StepEpochRequest(model_id="m", slot_id="r0c0"))
            before = report(d, "m", "r0c0")
            a = d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="m", slot_id="r0c0",
                                                              target=pb.STAGE_TRAINING))
            check(a.slot.stage == pb.STAGE_TRAINING, "not TRAINING: %d" % a.slot.stage)
            check(a.slot.previous_epochs_in_stage == before.metrics.epochs_in_current_stage,
                  "previous_epochs_in_stage %d, GERMINATED had %d epochs" %
                  (a.slot.previous_epochs_in_stage, before.metrics.epochs_in_current_stage))
            check(a.slot.stage_entered_at_unix_ns >= before.stage_entered_at_unix_ns,
                  "stage_entered_at went back")

            sums = dict(interaction_sum=1.5, boost_received=-0.25, upstream_alpha_sum=0.75,
                        downstream_alpha_sum=2.0)
            r = metrics(d, "m", "r0c0", **sums)
            for k, v in sums.items():
                check(getattr(r.metrics, k) == v, "%s = %r, sent %r" % (k, getattr(r.metrics, k), v))
            gen = d.call("GetModel", pb.GetModelRequest(model_id="m")).generation
            for k in sums:
                code, det = d.code("RecordMetrics", pb.RecordMetricsRequest(
                    model_id="m", slot_id="r0c0", **{k: math.inf}))
                check(code == SC.INVALID_ARGUMENT and k in det, "%s = inf: %s %r" % (k, code, det))
            check(d.call("GetModel", pb.GetModelRequest(model_id="m")).generation == gen,
                  "a refused RecordMetrics changed the model")
            code, det = d.code("RecordMetrics", pb.RecordMetricsRequest(
                model_id="m", slot_id="r0c0", use_collected_gradients=True))
            check(code == SC.FAILED_PRECONDITION and "TrainStep" in det,
                  "use_collected_gradients: %s %r" % (code, det))

            # G2 (permissive): 10 epochs in TRAINING and a measured gradient health.
            for k in range(10):
                metrics(d, "m", "r0c0", val_accuracy=42.0 + k * 0.1,
                        gradients=pb.GradientStats(gradient_norm=0.5, gradient_health=0.9,
                                                   seed_gradient_norm_ratio=0.2))
                d.call("StepEpoch", pb.StepEpochRequest(model_id="m", slot_id="r0c0"))
            metrics(d, "m", "r0c0", val_accuracy=43.0)
            a = d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="m", slot_id="r0c0",
                                                              target=pb.STAGE_BLENDING))
            check(a.slot.stage == pb.STAGE_BLENDING, "not BLENDING: %d (%s)" %
                  (a.slot.stage, list(a.gate.checks_failed)))
            check(a.slot.metrics.accuracy_at_blending_start == 43.0,
                  "accuracy_at_blending_start %r, expected 43.0" %
                  a.slot.metrics.accuracy_at_blending_start)
            blend = report(d, "m", "r0c0")

            d.call("CreateModel", pb.CreateModelRequest(model_id="p", cnn=CNN, slots=["r0c0"]))
            d.call("Germinate", pb.GerminateRequest(model_id="p", slot_id="r0c0",
                                                    blueprint_id="norm"))
            pr = d.call("Prune", pb.PruneRequest(model_id="p", slot_id="r0c0",
                                                 reason="governor_nan", initiator="governor"))
            check(pr.slot.metrics.auto_pruned and pr.slot.metrics.auto_prune_reason == "governor_nan",
                  "auto prune not reported: %r %r" % (pr.slot.metrics.auto_pruned,
                                                     pr.slot.metrics.auto_prune_reason))
            r = metrics(d, "p", "r0c0", clear_auto_pruned=True)
            check(not r.metrics.auto_pruned, "clear_auto_pruned left the flag set")
            pruned = report(d, "p", "r0c0")
        finally:
            rc = d.stop()
        check(rc == 0, "kasminad exited %s" % rc)
        d = Kasminad(BIN, tmp + "/run/k.sock", tmp + "/kasminad.log", "--no-cuda",
                     "--cpu-devices", "1", state_dir=state)
        try:
            for mid, want in (("m", blend), ("p", pruned)):
                got = report(d, mid, "r0c0")
                check(got.metrics == want.metrics, "%s: metrics differ after a restart:\n%s\n%s" %
                      (mid, got.metrics, want.metrics))
                check(got.previous_epochs_in_stage == want.previous_epochs_in_stage and
                      got.stage_entered_at_unix_ns == want.stage_entered_at_unix_ns,
                      "%s: stage fields differ after a restart" % mid)
        finally:
            d.stop()
    print("%d checks, %d failed" % (CHECKS, len(FAILS)))
    print("%d passed, %d failed" % (CHECKS - len(FAILS), len(FAILS)))
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
