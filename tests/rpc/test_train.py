#!/usr/bin/python3
"""Training over the wire (docs/training.md) against a real kasminad.

Usage: test_train.py <kasminad> <kasminactl> <dir with the generated stubs>

- ConfigureTraining: a new model has esper's defaults; unset fields keep their value; bad values
  are INVALID_ARGUMENT and change nothing; an unknown model is NOT_FOUND.
- TrainStep: every bad input (targets out of range, wrong dtype or shape, empty batch, unknown
  slot) is INVALID_ARGUMENT naming the field, and the weights, train_step and generation are
  unchanged; on a learnable batch the loss falls over steps, train_step counts them, the model's
  generation bumps, Forward afterwards runs on the new weights, and the gradient statistics come
  back when asked for.
- A transformer trains over the wire: its dropout spec (kept, defaulted, refused outside [0, 1)),
  targets [B, T] validated (shape and range INVALID_ARGUMENT naming them), the loss falls on a
  next-token task and Forward then predicts it, a seed steps, dropout 0.1 trains.
- Checkpoint on this daemon (--no-persist) answers FAILED_PRECONDITION with one sentence naming
  --no-persist (checkpoints themselves: test_checkpoint.py).
- kasminactl training / train show and run the same through the C client.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

BIN, CTL, PYDIR = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, PYDIR)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
import grpc  # noqa: E402
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402
from kasmina_client import Client, KasminaError, tensor_from_numpy  # noqa: E402
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


def weights(d, mid):
    return d.call("ExportWeights", pb.ExportWeightsRequest(model_id=mid)).safetensors


def state(d, mid):
    m = d.call("GetModel", pb.GetModelRequest(model_id=mid))
    return weights(d, mid), m.train_step, m.generation


def step_req(mid, x, y, **kw):
    return pb.TrainStepRequest(model_id=mid, input=tensor_from_numpy(x),
                               targets=tensor_from_numpy(y, "i64"), **kw)


def main():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    y = (np.arange(8) % 4).astype(np.int64)
    x[np.arange(8), y % 3, :4, :4] += 2.0  # learnable: the class shows in a corner
    with tempfile.TemporaryDirectory() as tmp:
        d = Kasminad(BIN, tmp + "/run/k.sock", tmp + "/kasminad.log", "--no-cuda",
                     "--cpu-devices", "1", "--no-persist")
        try:
            d.call("CreateModel", pb.CreateModelRequest(model_id="m", cnn=CNN, slots=["r0c0"]))
            c = d.call("ConfigureTraining", pb.ConfigureTrainingRequest(model_id="m"))
            check((c.host.lr, c.host.momentum, c.host.weight_decay, c.host.dampening,
                   c.host.nesterov) == (0.01, 0.9, 5e-4, 0.0, False), "host defaults %s" % c.host)
            check((c.seed.lr, c.seed.momentum, c.seed.weight_decay) == (0.01, 0.9, 0.0),
                  "seed defaults %s" % c.seed)
            check((c.max_grad_norm, c.gradient_telemetry_stride, c.gradient_ratio_ema,
                   c.vanishing_threshold, c.exploding_threshold) == (1.0, 10, 0.9, 1e-7, 10.0),
                  "defaults %s" % c)
            c = d.call("ConfigureTraining", pb.ConfigureTrainingRequest(
                model_id="m", host=pb.SgdConfig(lr=0.05), gradient_telemetry_stride=1))
            check(c.host.lr == 0.05 and c.host.momentum == 0.9 and
                  c.gradient_telemetry_stride == 1 and c.max_grad_norm == 1.0,
                  "a partial update changed other fields: %s" % c)
            for bad in (pb.ConfigureTrainingRequest(model_id="m", host=pb.SgdConfig(lr=-1)),
                        pb.ConfigureTrainingRequest(model_id="m", seed=pb.SgdConfig(momentum=2)),
                        pb.ConfigureTrainingRequest(model_id="m", max_grad_norm=float("nan"))):
                code, det = d.code("ConfigureTraining", bad)
                check(code == SC.INVALID_ARGUMENT, "ConfigureTraining %s: %s %r" % (bad, code, det))
            c2 = d.call("ConfigureTraining", pb.ConfigureTrainingRequest(model_id="m"))
            check(c2 == c, "a refused ConfigureTraining changed the configuration")
            code, _ = d.code("ConfigureTraining", pb.ConfigureTrainingRequest(model_id="nope"))
            check(code == SC.NOT_FOUND, "ConfigureTraining of an unknown model: %s" % code)

            before = state(d, "m")
            bads = [
                ("targets out of range", step_req("m", x, np.full(8, 4, np.int64)), "targets"),
                ("negative target", step_req("m", x, -np.ones(8, np.int64)), "targets"),
                ("targets as float", pb.TrainStepRequest(
                    model_id="m", input=tensor_from_numpy(x),
                    targets=tensor_from_numpy(y.astype(np.float32))), "targets"),
                ("targets of another length", step_req("m", x, y[:5]), "targets"),
                ("input of the wrong rank", step_req("m", x[0], y), "input"),
                ("empty batch", step_req("m", x[:0], y[:0]), ""),
                ("unknown slot", step_req("m", x, y, slots=["r9c9"]), "r9c9"),
            ]
            for what, req, field in bads:
                code, det = d.code("TrainStep", req)
                check(code == SC.INVALID_ARGUMENT and field in det,
                      "TrainStep %s: %s %r" % (what, code, det))
            check(state(d, "m") == before, "a refused TrainStep changed the model")

            f0 = d.call("Forward", pb.ForwardRequest(model_id="m", input=tensor_from_numpy(x)))
            losses = []
            for k in range(8):
                r = d.call("TrainStep", step_req("m", x, y))
                losses.append(r.loss)
                check(r.train_step == k + 1 and r.total == 8 and 0 <= r.correct <= 8,
                      "step %d: train_step %d, %d/%d" % (k, r.train_step, r.correct, r.total))
                # Host only: esper collects nothing without a seed in TRAINING or BLENDING.
                check(not r.gradients_collected, "host-only step %d collected statistics" % k)
            print("train: losses %s" % ["%.4f" % v for v in losses], flush=True)
            check(losses[-1] < losses[0] * 0.9, "the loss did not fall: %s" % losses)
            after = state(d, "m")
            check(after[1] == 8 and after[2] > before[2] and after[0] != before[0],
                  "after 8 steps: train_step %d, generation %d -> %d" %
                  (after[1], before[2], after[2]))
            f1 = d.call("Forward", pb.ForwardRequest(model_id="m", input=tensor_from_numpy(x)))
            check(f1.output.data != f0.output.data, "Forward did not see the trained weights")
            # A seed in TRAINING: statistics every step (stride 1), its optimizer steps.
            d.call("Germinate", pb.GerminateRequest(model_id="m", slot_id="r0c0",
                                                    blueprint_id="norm"))
            a = d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="m", slot_id="r0c0",
                                                              target=pb.STAGE_TRAINING))
            check(a.slot.stage == pb.STAGE_TRAINING, "not TRAINING: %s" % list(a.gate.checks_failed))
            # Nothing collected for this seed yet: the fold is refused and changes nothing.
            gen = state(d, "m")[2]
            code, det = d.code("RecordMetrics", pb.RecordMetricsRequest(
                model_id="m", slot_id="r0c0", val_accuracy=40.0, use_collected_gradients=True))
            check(code == SC.FAILED_PRECONDITION and "TrainStep" in det,
                  "fold before any collection: %s %r" % (code, det))
            check(state(d, "m")[2] == gen, "a refused fold changed the model")
            r = d.call("TrainStep", step_req("m", x, y))
            check(r.gradients_collected and r.host_grad_norm > 0 and r.host_param_count > 0 and
                  [s.slot_id for s in r.seeds] == ["r0c0"] and r.seeds[0].param_count > 0 and
                  0 <= r.seeds[0].gradient_health <= 1,
                  "statistics with a TRAINING seed: %s" % r)
            check(list(r.stepped_slots) == ["r0c0"], "stepped slots %s" % list(r.stepped_slots))
            # RecordMetrics folds the last collected statistics (esper's epoch end): the ratio
            # EMA starts at 0.0 for the model's first seed (beta 0.9), then beta*ema + (1-beta)*r.
            beta, q = 0.9, [r.seeds[0]]
            d.call("RecordMetrics", pb.RecordMetricsRequest(
                model_id="m", slot_id="r0c0", val_accuracy=40.0, use_collected_gradients=True))
            r = d.call("TrainStep", step_req("m", x, y, collect_gradients=False))
            check(not r.gradients_collected, "collect_gradients=false still collected")
            r = d.call("TrainStep", step_req("m", x, y, slots=["r0c0"], collect_gradients=True))
            check(r.gradients_collected and list(r.stepped_slots) == ["r0c0"],
                  "slots=[r0c0]: %s" % r)
            q.append(r.seeds[0])  # the step without statistics left the first ones in between
            d.call("RecordMetrics", pb.RecordMetricsRequest(
                model_id="m", slot_id="r0c0", val_accuracy=41.0, use_collected_gradients=True))
            rep = d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id="m",
                                                                    slot_id="r0c0")).slots[0]
            ema = beta * ((1 - beta) * q[0].normalized_ratio) + (1 - beta) * q[1].normalized_ratio
            got = rep.metrics.seed_gradient_norm_ratio
            check(rep.metrics.HasField("opt_seed_gradient_norm_ratio") and
                  abs(got - ema) <= 1e-12 * max(1.0, ema) and ema > 0,
                  "folded ratio %r, expected %r from %r" % (got, ema, [s.normalized_ratio for s in q]))
            g = rep.gradients
            check(g.gradient_norm == q[1].grad_norm and g.gradient_health == q[1].gradient_health
                  and g.has_vanishing == q[1].has_vanishing
                  and g.has_exploding == q[1].has_exploding
                  and rep.metrics.current_val_accuracy == 41.0,
                  "folded telemetry %s, last step %s" % (g, q[1]))

            code, det = d.code("Checkpoint", pb.CheckpointRequest(model_id="m"))
            check(code == SC.FAILED_PRECONDITION and "--no-persist" in det,
                  "Checkpoint without persistence: %s %r" % (code, det))

            # kasminactl, through the C client.
            path = os.path.join(tmp, "batch.safetensors")
            np_save_safetensors(path, {"x": x, "y": y})
            env = dict(os.environ)
            out = subprocess.run([CTL, "--socket", d.sock, "--json", "training", "m",
                                  "--seed-lr", "0.02"], capture_output=True, text=True, env=env)
            check(out.returncode == 0, "kasminactl training: %s" % out.stderr)
            if out.returncode == 0:
                j = json.loads(out.stdout)
                check(j["seed"]["lr"] == 0.02 and j["host"]["lr"] == 0.05 and j["train_step"] == 11,
                      "kasminactl training json: %s" % j)
            out = subprocess.run([CTL, "--socket", d.sock, "train", "m", "--input", path + ":x",
                                  "--targets", path + ":y", "--batch", "4", "--epochs", "2"],
                                 capture_output=True, text=True, env=env)
            lines = [line for line in out.stdout.splitlines() if line.startswith("epoch")]
            check(out.returncode == 0 and len(lines) == 4 and "step 15" in lines[-1],
                  "kasminactl train: rc %d %r %r" % (out.returncode, out.stdout, out.stderr))
            out = subprocess.run([CTL, "--socket", d.sock, "train", "m", "--input", path + ":x",
                                  "--targets", path + ":x"], capture_output=True, text=True)
            check(out.returncode != 0, "kasminactl train with float targets succeeded")

            # The Python client (numpy in, the reply out).
            with Client("unix:" + d.sock) as cl:
                cfg = cl.configure_training("m", seed={"lr": 0.03}, max_grad_norm=0.5)
                check(cfg.seed.lr == 0.03 and cfg.max_grad_norm == 0.5 and cfg.host.lr == 0.05,
                      "Client.configure_training: %s" % cfg)
                r = cl.train_step("m", x, y, collect_gradients=True)
                check(r.train_step == 16 and r.total == 8 and r.gradients_collected,
                      "Client.train_step: %s" % r)
                try:
                    cl.train_step("m", x, np.full(8, 9))
                    check(False, "Client.train_step with targets out of range succeeded")
                except KasminaError as e:
                    check(e.code == SC.INVALID_ARGUMENT, "Client.train_step bad targets: %s" % e)

            transformer(d, rng)
        finally:
            rc = d.stop()
        check(rc == 0, "kasminad exited %s" % rc)
    print("%d checks, %d failed" % (CHECKS, len(FAILS)))
    print("%d passed, %d failed" % (CHECKS - len(FAILS), len(FAILS)))
    sys.exit(1 if FAILS else 0)


TF = dict(vocab_size=13, n_embd=16, n_head=2, n_layer=2, block_size=8, num_segments=2)


def transformer(d, rng):
    """A transformer over the wire: token ids [B, T] in, targets [B, T] (the next token)."""
    d.call("CreateModel", pb.CreateModelRequest(
        model_id="tf", transformer=pb.TransformerHostSpec(dropout=0.0, **TF), slots=["r0c0"],
        init_seed=5))
    d.call("CreateModel", pb.CreateModelRequest(
        model_id="tfd", transformer=pb.TransformerHostSpec(**TF), init_seed=5))
    m0 = d.call("GetModel", pb.GetModelRequest(model_id="tf")).transformer
    m1 = d.call("GetModel", pb.GetModelRequest(model_id="tfd")).transformer
    check(m0.HasField("dropout") and m0.dropout == 0.0, "dropout 0 not kept: %s" % m0)
    check(abs(m1.dropout - 0.1) < 1e-7, "dropout default %r, expected 0.1" % m1.dropout)
    code, det = d.code("CreateModel", pb.CreateModelRequest(
        model_id="tfx", transformer=pb.TransformerHostSpec(dropout=1.0, **TF)))
    check(code == SC.INVALID_ARGUMENT and "dropout" in det, "dropout 1.0: %s %r" % (code, det))

    # a learnable task: the next token is the current one plus 1 (mod V)
    V = TF["vocab_size"]
    x = rng.integers(0, V, (6, 7)).astype(np.int64)
    y = (x + 1) % V
    before = state(d, "tf")
    bads = [
        ("targets [B]", step_req("tf", x, y[:, 0]), "targets"),
        ("targets [B, T-1]", step_req("tf", x, y[:, :6]), "targets"),
        ("a target id = vocab", step_req("tf", x, np.where(x == x[2, 3], V, y)), "targets"),
        ("a negative target", step_req("tf", x, -y - 1), "targets"),
        ("an input id = vocab", step_req("tf", np.full((6, 7), V, np.int64), y), "vocabulary"),
    ]
    for what, req, field in bads:
        code, det = d.code("TrainStep", req)
        check(code == SC.INVALID_ARGUMENT and field in det,
              "transformer TrainStep %s: %s %r" % (what, code, det))
    check(state(d, "tf") == before, "a refused transformer TrainStep changed the model")

    d.call("ConfigureTraining", pb.ConfigureTrainingRequest(
        model_id="tf", host=pb.SgdConfig(lr=0.1), gradient_telemetry_stride=1))
    losses = []
    for k in range(25):
        r = d.call("TrainStep", step_req("tf", x, y))
        losses.append(r.loss)
        check(r.train_step == k + 1 and r.total == 42 and 0 <= r.correct <= 42,
              "transformer step %d: train_step %d, %d/%d" % (k, r.train_step, r.correct, r.total))
    print("train transformer: losses %s" % ["%.4f" % v for v in losses[::4]], flush=True)
    check(losses[-1] < losses[0] * 0.7, "the transformer's loss did not fall: %s" % losses)
    f = d.call("Forward", pb.ForwardRequest(model_id="tf", input=tensor_from_numpy(x)))
    logits = np.frombuffer(f.output.data, np.float32).reshape(6, 7, V)
    acc = float((logits.argmax(-1) == y).mean())
    check(acc > 0.5, "Forward after training: next-token accuracy %.2f" % acc)

    # a seed trains through the wire too (lora in TRAINING: the STE)
    d.call("Germinate", pb.GerminateRequest(model_id="tf", slot_id="r0c0", blueprint_id="lora"))
    d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="tf", slot_id="r0c0",
                                                  target=pb.STAGE_TRAINING))
    r = d.call("TrainStep", step_req("tf", x, y))
    check(r.gradients_collected and [s.slot_id for s in r.seeds] == ["r0c0"] and
          r.seeds[0].param_count == 16 * 16 and list(r.stepped_slots) == ["r0c0"],
          "a transformer seed's statistics: %s" % r)

    # dropout 0.1 (the default): finite, and the eval-mode Forward is unaffected by it
    for k in range(3):
        r = d.call("TrainStep", step_req("tfd", x, y))
        check(np.isfinite(r.loss) and r.train_step == k + 1, "dropout step %d: %s" % (k, r))


def np_save_safetensors(path, arrays):
    """A safetensors file written by hand (the format is a JSON header and raw bytes)."""
    header, blobs, off = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        dt = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[a.dtype]
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


if __name__ == "__main__":
    main()
