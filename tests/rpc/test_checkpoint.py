#!/usr/bin/python3
"""Checkpoints: training progress made durable (docs/training.md#durability-and-checkpoints),
against real kasminads on real state directories, killed with SIGKILL.

Usage: test_checkpoint.py <kasminad> <kasminactl> <dir with the generated stubs>

1. crash: model m (a GATE seed in BLENDING, so the host, the seed and its gate all have momentum,
   and a non-default training configuration) is checkpointed, trains on three more batches (the
   reference run), trains on in the background and is killed with SIGKILL; restarted, it has the
   checkpoint's weights byte for byte, train_step = checkpoint_step = the checkpoint's, its stage
   from the journal and its configuration; the same three batches then give bit-identical losses
   and weights, which needs the momentum buffers back bit for bit: after another SIGKILL the same
   run with the momentum dropped (ConfigureTraining reset_optimizer_state) differs.
2. journal over checkpoint: model j is checkpointed, then trains and goes through lifecycle calls
   (to BLENDING, HOLDING, FOSSILIZED, a second seed germinated and trained) whose journal records
   carry tensors trained past the checkpoint; after SIGKILL the lifecycle is the journal's, the
   host and the first seed have the checkpoint's tensors, the seed germinated after it its initial
   ones; a reference daemon started on a copy of the checkpoint that gets the same lifecycle calls
   (no training) has the same tensors and trains to bit-identical losses and weights.
3. --checkpoint-interval 3: checkpoint_step follows every third step before that step answers;
   after SIGKILL the model is at the last multiple of 3 with its weights of then.
4. concurrency: TrainSteps and Checkpoints racing on one model, then SIGKILL: the model comes back
   at a step s = checkpoint_step with exactly the weights of s steps of that batch sequence (a
   checkpoint never mixes two steps).
5. bad input and damage: unknown model NOT_FOUND, bad id INVALID_ARGUMENT, --no-persist
   FAILED_PRECONDITION (and refused together with --checkpoint-interval); a flipped byte in a
   momentum buffer (checksum) and a malformed training state (unchecked snapshot) quarantine the
   model, naming the file; a torn temporary file of a checkpoint leaves the previous one, and a
   link planted in its place is not written through.
6. kasminactl checkpoint (table, --json, exit code 5 without persistence) and
   Client.checkpoint() of the Python client.
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading

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
RNG = np.random.default_rng(5)
BATCHES = []
for _k in range(64):
    _x = RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)
    _y = RNG.integers(0, 4, 8).astype(np.int64)
    _x[np.arange(8), _y % 3, :4, :4] += 2.0
    BATCHES.append((_x, _y))


class Daemon(Kasminad):
    def __init__(self, tmp, name, state=None, extra=()):
        flags = ["--no-cuda", "--cpu-devices", "1", *extra]
        if state is None:
            flags.append("--no-persist")
        super().__init__(BIN, os.path.join(tmp, name + ".sock"), os.path.join(tmp, name + ".log"),
                         *flags, state_dir=state, log_mode="a", ready_timeout=20)

    def sigkill(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=30)
        self.close()


def step(d, mid, k, **kw):
    x, y = BATCHES[k]
    return d.call("TrainStep", pb.TrainStepRequest(model_id=mid, input=tensor_from_numpy(x),
                                                   targets=tensor_from_numpy(y, "i64"), **kw))


def model(d, mid):
    return d.call("GetModel", pb.GetModelRequest(model_id=mid))


def export(d, mid):
    return d.call("ExportWeights", pb.ExportWeightsRequest(model_id=mid)).safetensors


def st_parse(blob):
    """({name: (dtype, shape, raw bytes)}, metadata) of a safetensors image."""
    n = struct.unpack_from("<Q", blob, 0)[0]
    hdr = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = hdr.pop("__metadata__", {})
    return ({k: (v["dtype"], tuple(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]])
             for k, v in hdr.items()}, meta)


def tensors(d, mid, prefix=""):
    return {k: v for k, v in st_parse(export(d, mid))[0].items() if k.startswith(prefix)}


def stage(d, mid, slot):
    return d.call("GetSlotReports", pb.GetSlotReportsRequest(model_id=mid,
                                                             slot_id=slot)).slots[0].stage


def checkpoint(d, mid=""):
    return dict(d.call("Checkpoint", pb.CheckpointRequest(model_id=mid)).checkpoint_step)


def lifecycle(d, calls):
    """Runs (method, request) pairs; AdvanceStage must pass its gate."""
    for method, req in calls:
        r = d.call(method, req)
        if method == "AdvanceStage":
            check(r.gate.passed, "%s %s: gate %s" % (method, req, list(r.gate.checks_failed)))


def to_blending(mid, slot):
    """Permissive G2: ten epochs in TRAINING with a healthy gradient, then BLENDING."""
    calls = [("RecordMetrics", pb.RecordMetricsRequest(
        model_id=mid, slot_id=slot, val_accuracy=40.0 + i,
        gradients=pb.GradientStats(gradient_health=1.0))) for i in range(10)]
    return calls + [("AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=slot,
                                                            target=pb.STAGE_BLENDING))]


def advance(mid, slot, target):
    return ("AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=slot, target=target))


def train_in_background(d, mids, first):
    """A thread stepping the models until the daemon dies; .steps counts the replies."""
    t = threading.Thread(daemon=True)
    t.steps = 0

    def run():
        k = first
        try:
            while True:
                for mid in mids:
                    step(d, mid, k % len(BATCHES))
                    t.steps += 1
                k += 1
        except grpc.RpcError:
            pass
    t.run = run
    t.start()
    return t


def kill_while_training(d, mids, first):
    """SIGKILL while TrainSteps are in flight (after a few have been answered)."""
    t = train_in_background(d, mids, first)
    while t.steps < 4 and t.is_alive():
        t.join(0.01)
    d.sigkill()
    t.join(30)


# ---- 1 and 2 ----

def test_crash_and_journal(tmp):
    state = os.path.join(tmp, "a-state")
    d = Daemon(tmp, "a", state)
    # m: host, seed and gate momentum; a configuration of its own.
    d.call("CreateModel", pb.CreateModelRequest(model_id="m", cnn=CNN, slots=["r0c0"],
                                                init_seed=11, permissive_gates=True))
    cfg = d.call("ConfigureTraining", pb.ConfigureTrainingRequest(
        model_id="m", host=pb.SgdConfig(lr=0.05), seed=pb.SgdConfig(momentum=0.8),
        max_grad_norm=0.5, gradient_telemetry_stride=1))
    lifecycle(d, [("Germinate", pb.GerminateRequest(
        model_id="m", slot_id="r0c0", blueprint_id="conv_light", blend_algorithm_id="gated",
        alpha_algorithm=pb.ALPHA_ALGORITHM_GATE, init_seed=3)),
        advance("m", "r0c0", pb.STAGE_TRAINING)])
    for k in range(3):
        step(d, "m", k)
    lifecycle(d, to_blending("m", "r0c0") +
              [("StepEpoch", pb.StepEpochRequest(model_id="m"))])
    for k in range(3, 6):
        step(d, "m", k)
    check(checkpoint(d, "m") == {"m": 6}, "Checkpoint(m) answers {m: 6}")
    mi = model(d, "m")
    check(mi.train_step == 6 and mi.checkpoint_step == 6,
          "after Checkpoint: train_step %d, checkpoint_step %d" % (mi.train_step,
                                                                    mi.checkpoint_step))
    snap = open(os.path.join(state, "models", "m.d", "snapshot.safetensors"), "rb").read()
    ts, meta = st_parse(snap)
    opt = sorted(k for k in ts if k.startswith("_kasmina_optim."))
    params = tensors(d, "m")
    check(all(k.endswith(".momentum_buffer") and
              ts[k][0] == "F32" and
              ts[k][1] == params[k[len("_kasmina_optim."):-len(".momentum_buffer")]][1]
              for k in opt),
          "momentum buffers are F32 tensors named after their parameters: %s" % opt)
    for part in ("_kasmina_optim.host.", "_kasmina_optim.seed_slots.r0c0.seed.",
                 "_kasmina_optim.seed_slots.r0c0.alpha_schedule."):
        check(any(k.startswith(part) for k in opt), "the checkpoint has %s* buffers" % part)
    tr = json.loads(meta.get("kasmina.training", "{}"))
    check(meta.get("kasmina.train_step") == "6" and tr.get("config", {}).get("host", {})
          .get("lr") == 0.05 and tr.get("host_optimizer") is True and
          tr.get("seed_optimizers") == {"r0c0": {"fossilized": False}},
          "the checkpoint's training metadata: %s %s" % (meta.get("kasmina.train_step"), tr))

    # j: a checkpoint, then training and lifecycle calls journalled over it.
    d.call("CreateModel", pb.CreateModelRequest(model_id="j", cnn=CNN, slots=["r0c0", "r0c1"],
                                                init_seed=12, permissive_gates=True))
    lifecycle(d, [("Germinate", pb.GerminateRequest(model_id="j", slot_id="r0c0",
                                                    blueprint_id="conv_light",
                                                    blend_tempo_epochs=1, init_seed=4)),
                  advance("j", "r0c0", pb.STAGE_TRAINING)])
    for k in range(2):
        step(d, "j", 20 + k)
    check(checkpoint(d) == {"m": 6, "j": 2}, "Checkpoint(\"\") answers every model")
    w_m = export(d, "m")
    j_ckpt = tensors(d, "j")
    ref_state = os.path.join(tmp, "ref-state")
    shutil.copytree(state, ref_state, ignore=shutil.ignore_patterns("LOCK"))

    # The reference run of m from its checkpoint.
    loss_m = [step(d, "m", k).loss for k in range(6, 9)]
    w_m9 = export(d, "m")

    for k in range(2, 4):
        step(d, "j", 20 + k)
    after = to_blending("j", "r0c0") + [
        ("StepEpoch", pb.StepEpochRequest(model_id="j")),
        advance("j", "r0c0", pb.STAGE_HOLDING),
        ("RecordMetrics", pb.RecordMetricsRequest(model_id="j", slot_id="r0c0",
                                                  counterfactual_contribution=2.0)),
        advance("j", "r0c0", pb.STAGE_FOSSILIZED),
        ("Germinate", pb.GerminateRequest(model_id="j", slot_id="r0c1",
                                          blueprint_id="conv_light", init_seed=9))]
    lifecycle(d, after)
    j_germ = tensors(d, "j", "seed_slots.r0c1.")
    after2 = [advance("j", "r0c1", pb.STAGE_TRAINING)]
    lifecycle(d, after2)
    for k in range(4, 6):
        step(d, "j", 20 + k)
    after3 = [("StepEpoch", pb.StepEpochRequest(model_id="j"))]
    lifecycle(d, after3)
    trained = tensors(d, "j")
    check(any(trained[k] != j_ckpt[k] for k in j_ckpt if k.startswith("seed_slots.r0c0.")) and
          any(trained[k] != j_germ[k] for k in j_germ),
          "j's seeds trained past the checkpoint before the kill (the journal carries those)")

    kill_while_training(d, ["m", "j"], 30)

    # ---- restart: the checkpoint, the journal's lifecycle ----
    d = Daemon(tmp, "a", state)
    r = d.call("ListModels", pb.ListModelsRequest())
    check(sorted(x.model_id for x in r.models) == ["j", "m"] and not r.quarantined,
          "restart: models %s, quarantined %s" % ([x.model_id for x in r.models],
                                                 [q.model_id for q in r.quarantined]))
    mi = model(d, "m")
    check(mi.train_step == 6 and mi.checkpoint_step == 6,
          "restart: m train_step %d, checkpoint_step %d" % (mi.train_step, mi.checkpoint_step))
    check(export(d, "m") == w_m, "restart: m's weights are the checkpoint's, byte for byte")
    check(stage(d, "m", "r0c0") == pb.STAGE_BLENDING, "restart: m's seed is BLENDING")
    c2 = d.call("ConfigureTraining", pb.ConfigureTrainingRequest(model_id="m"))
    cfg.train_step = 6
    check(c2 == cfg, "restart: m's training configuration %s, was %s" % (c2, cfg))
    got = [step(d, "m", k).loss for k in range(6, 9)]
    check(got == loss_m, "restart: the same batches give bit-identical losses %r vs %r" %
          (got, loss_m))
    check(export(d, "m") == w_m9, "restart: ... and bit-identical weights")

    ji = model(d, "j")
    check(ji.train_step == 2 and ji.checkpoint_step == 2,
          "restart: j train_step %d, checkpoint_step %d" % (ji.train_step, ji.checkpoint_step))
    check(stage(d, "j", "r0c0") == pb.STAGE_FOSSILIZED and
          stage(d, "j", "r0c1") == pb.STAGE_TRAINING,
          "restart: j's lifecycle is the journal's (FOSSILIZED, TRAINING)")
    jt = tensors(d, "j")
    for k, v in jt.items():
        want = j_germ[k] if k.startswith("seed_slots.r0c1.") else j_ckpt.get(k)
        check(v == want, "restart: j's %s is the %s's" %
              (k, "germination" if k.startswith("seed_slots.r0c1.") else "checkpoint"))

    # The reference: the checkpoint plus the same lifecycle calls, without the training.
    ref = Daemon(tmp, "ref", ref_state)
    lifecycle(ref, after + after2 + after3)
    check(tensors(ref, "j") == jt, "reference: the same tensors as the restarted j")
    for k in range(40, 43):
        a, b = step(d, "j", k), step(ref, "j", k)
        check(a.loss == b.loss and a.correct == b.correct and
              list(a.stepped_slots) == list(b.stepped_slots),
              "j step %d: restarted %r %s, reference %r %s" %
              (k, a.loss, list(a.stepped_slots), b.loss, list(b.stepped_slots)))
    check(tensors(d, "j") == tensors(ref, "j"),
          "j: the restarted model and the reference train to bit-identical tensors")
    check(ref.stop() == 0, "reference: SIGTERM exits 0")

    # Bad input on a persisting daemon.
    code, det = d.code("Checkpoint", pb.CheckpointRequest(model_id="nope"))
    check(code == SC.NOT_FOUND and "nope" in det, "Checkpoint(nope): %s %r" % (code, det))
    code, det = d.code("Checkpoint", pb.CheckpointRequest(model_id="a/b"))
    check(code == SC.INVALID_ARGUMENT and "model_id" in det, "Checkpoint(a/b): %s %r" % (code, det))

    # kasminactl and the Python client.
    out = subprocess.run([CTL, "--socket", d.sock, "checkpoint", "m"], capture_output=True,
                         text=True)
    check(out.returncode == 0 and "CHECKPOINT_STEP" in out.stdout and
          any(line.split() == ["m", "9"] for line in out.stdout.splitlines()),
          "kasminactl checkpoint m: rc %d %r %r" % (out.returncode, out.stdout, out.stderr))
    out = subprocess.run([CTL, "--socket", d.sock, "--json", "checkpoint"], capture_output=True,
                         text=True)
    check(out.returncode == 0 and
          json.loads(out.stdout or "{}") == {"checkpoint_step": {"m": 9, "j": 5}},
          "kasminactl --json checkpoint: rc %d %r" % (out.returncode, out.stdout))
    out = subprocess.run([CTL, "--socket", d.sock, "--json", "models"], capture_output=True,
                         text=True)
    ms = {x["model_id"]: x for x in json.loads(out.stdout or "{}").get("models", [])}
    check(ms.get("m", {}).get("checkpoint_step") == 9 and ms.get("m", {}).get("train_step") == 9,
          "kasminactl --json models shows train_step and checkpoint_step: %r" % out.stdout)
    with Client("unix:" + d.sock) as cl:
        check(cl.checkpoint("j") == {"j": 5} and cl.checkpoint() == {"m": 9, "j": 5},
              "Client.checkpoint")
        try:
            cl.checkpoint("nope")
            check(False, "Client.checkpoint(nope) succeeded")
        except KasminaError as e:
            check(e.code == SC.NOT_FOUND, "Client.checkpoint(nope): %s" % e)

    # The control: without the momentum the continuation differs (so the equality above needs it).
    w9 = export(d, "m")
    plain = [step(d, "m", k).loss for k in range(50, 53)]
    w12 = export(d, "m")
    kill_while_training(d, ["m"], 50)
    d = Daemon(tmp, "a", state)
    mi = model(d, "m")
    check(mi.train_step == 9 and mi.checkpoint_step == 9 and export(d, "m") == w9,
          "third start: m is back at its checkpoint of train_step 9")
    d.call("ConfigureTraining", pb.ConfigureTrainingRequest(model_id="m",
                                                            reset_optimizer_state=True))
    reset = [step(d, "m", k).loss for k in range(50, 53)]
    check(reset[0] == plain[0] and reset[1:] != plain[1:] and export(d, "m") != w12,
          "control: with the momentum dropped the same batches give other results "
          "(%r vs %r)" % (reset, plain))
    check(d.stop() == 0, "a: SIGTERM exits 0")


# ---- 3, 4, 5 ----

def test_interval_concurrency_damage(tmp):
    state = os.path.join(tmp, "b-state")
    d = Daemon(tmp, "b", state, ("--checkpoint-interval", "3"))
    d.call("CreateModel", pb.CreateModelRequest(model_id="k", cnn=CNN, slots=["r0c0"],
                                                init_seed=21))
    seen, w6 = [], None
    for k in range(7):
        r = step(d, "k", k)
        seen.append((r.train_step, model(d, "k").checkpoint_step))
        if r.train_step == 6:
            w6 = export(d, "k")
    check(seen == [(1, 0), (2, 0), (3, 3), (4, 3), (5, 3), (6, 6), (7, 6)],
          "--checkpoint-interval 3: (train_step, checkpoint_step) %s" % seen)
    # k2, k3: checkpointed (with momentum) by the interval, for the damage below.
    for mid in ("k2", "k3"):
        d.call("CreateModel", pb.CreateModelRequest(model_id=mid, cnn=CNN, slots=["r0c0"],
                                                    init_seed=22))
        for k in range(3):
            step(d, mid, k)
    w_k3 = export(d, "k3")
    # Concurrency: TrainSteps and Checkpoints racing on model c.
    d.call("CreateModel", pb.CreateModelRequest(model_id="c", cnn=CNN, slots=["r0c0"],
                                                init_seed=23))
    done = threading.Event()

    def checkpoints():
        try:
            while not done.is_set():
                checkpoint(d, "c")
        except grpc.RpcError:
            pass
    ck = threading.Thread(target=checkpoints, daemon=True)
    ck.start()
    for k in range(10):
        step(d, "c", k)
    kill_while_training(d, ["c"], 10)
    done.set()
    ck.join(30)

    d = Daemon(tmp, "b", state, ("--checkpoint-interval", "3"))
    ki = model(d, "k")
    check(ki.train_step == 6 and ki.checkpoint_step == 6 and export(d, "k") == w6,
          "interval: after SIGKILL k is at train_step %d (checkpoint %d) with step 6's weights" %
          (ki.train_step, ki.checkpoint_step))
    ci = model(d, "c")
    check(ci.train_step == ci.checkpoint_step and ci.train_step >= 10,
          "concurrency: c restarts at train_step %d = checkpoint_step %d (>= 10 acknowledged)" %
          (ci.train_step, ci.checkpoint_step))
    w_c = export(d, "c")
    check(d.stop() == 0, "b: SIGTERM exits 0")

    # The reference of c: the same batches, as many steps, on a daemon without state.
    nd = Daemon(tmp, "nopersist")
    nd.call("CreateModel", pb.CreateModelRequest(model_id="c", cnn=CNN, slots=["r0c0"],
                                                 init_seed=23))
    for k in range(ci.train_step):
        step(nd, "c", k % len(BATCHES))
    check(export(nd, "c") == w_c,
          "concurrency: c's checkpoint holds exactly the weights of %d steps" % ci.train_step)
    # --no-persist: FAILED_PRECONDITION.
    for mid in ("", "c"):
        code, det = nd.code("Checkpoint", pb.CheckpointRequest(model_id=mid))
        check(code == SC.FAILED_PRECONDITION and "--no-persist" in det,
              "Checkpoint(%r) without persistence: %s %r" % (mid, code, det))
    out = subprocess.run([CTL, "--socket", nd.sock, "checkpoint"], capture_output=True, text=True)
    check(out.returncode == 5 and "--no-persist" in out.stderr,
          "kasminactl checkpoint without persistence: rc %d %r" % (out.returncode, out.stderr))
    with Client("unix:" + nd.sock) as cl:
        try:
            cl.checkpoint()
            check(False, "Client.checkpoint() without persistence succeeded")
        except KasminaError as e:
            check(e.code == SC.FAILED_PRECONDITION, "Client.checkpoint() no persist: %s" % e)
    check(nd.stop() == 0, "no-persist daemon: SIGTERM exits 0")
    p = subprocess.run([BIN, "--listen", "unix:" + os.path.join(tmp, "x.sock"), "--no-persist",
                        "--checkpoint-interval", "5"], capture_output=True, text=True, timeout=30)
    check(p.returncode == 2 and "--checkpoint-interval" in p.stderr,
          "--no-persist with --checkpoint-interval: rc %d %r" % (p.returncode, p.stderr))

    # Damage. k: a flipped byte inside a momentum buffer (the checksum catches it).
    kdir = os.path.join(state, "models", "k.d")
    snap = open(kdir + "/snapshot.safetensors", "rb").read()
    n = struct.unpack_from("<Q", snap, 0)[0]
    hdr = json.loads(snap[8:8 + n])
    name = next(k for k in hdr if k.startswith("_kasmina_optim.host."))
    at = 8 + n + hdr[name]["data_offsets"][0]
    bad = bytearray(snap)
    bad[at] ^= 0x40
    open(kdir + "/snapshot.safetensors", "wb").write(bytes(bad))
    # k2: an unchecked snapshot (no kasmina.crc32c) whose momentum buffer names no parameter.
    k2 = os.path.join(state, "models", "k2.d", "snapshot.safetensors")
    snap = open(k2, "rb").read()
    n = struct.unpack_from("<Q", snap, 0)[0]
    hdr = json.loads(snap[8:8 + n])
    hdr["__metadata__"].pop("kasmina.crc32c")
    name = next(k for k in hdr if k.startswith("_kasmina_optim.host."))
    hdr["_kasmina_optim.host.nope.momentum_buffer"] = hdr.pop(name)
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 8)
    open(k2, "wb").write(struct.pack("<Q", len(h)) + h + snap[8 + n:])
    # k3: a checkpoint torn while it was written (its temporary file): the previous one stays.
    open(os.path.join(state, "models", "k3.d", ".snapshot.safetensors.tmp"), "wb").write(
        snap[:1000])
    d = Daemon(tmp, "b", state)
    r = d.call("ListModels", pb.ListModelsRequest())
    q = {x.model_id: x for x in r.quarantined}
    check(sorted(q) == ["k", "k2"] and sorted(x.model_id for x in r.models) == ["c", "k3"],
          "damage: quarantined %s, served %s" % (sorted(q), [x.model_id for x in r.models]))
    check("k" in q and "snapshot.safetensors" in q["k"].reason and "CRC32C" in q["k"].reason,
          "damage: k's reason names the snapshot and its checksum: %r" %
          (q["k"].reason if "k" in q else None))
    check("k2" in q and "training state" in q["k2"].reason and "nope" in q["k2"].reason,
          "damage: k2's reason names the bad momentum buffer: %r" %
          (q["k2"].reason if "k2" in q else None))
    check(export(d, "k3") == w_k3 and model(d, "k3").checkpoint_step == 3,
          "damage: a torn temporary checkpoint leaves k3's previous one")
    # A link planted where a checkpoint writes its temporary file is replaced, never written
    # through.
    victim = os.path.join(tmp, "victim")
    open(victim, "wb").write(b"keep me")
    tmpf = os.path.join(state, "models", "k3.d", ".snapshot.safetensors.tmp")
    if os.path.lexists(tmpf):
        os.remove(tmpf)
    os.symlink(victim, tmpf)
    check(checkpoint(d, "k3") == {"k3": 3} and open(victim, "rb").read() == b"keep me" and
          not os.path.lexists(tmpf),
          "a link at the temporary file: the checkpoint is written, the link's target untouched")
    check(d.stop() == 0, "b: SIGTERM exits 0 after the damage")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        try:
            test_crash_and_journal(tmp)
            test_interval_concurrency_damage(tmp)
        except SystemExit as e:
            check(False, "a daemon did not come up: %s" % str(e)[-2000:])
    print("%d checks, %d failed" % (CHECKS, len(FAILS)))
    print("%d passed, %d failed" % (CHECKS - len(FAILS), len(FAILS)))
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
