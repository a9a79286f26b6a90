"""Shared by the metrics tests: a real kasminad with --metrics-listen 127.0.0.1:0 on loopback,
its gRPC channel over a temporary Unix socket, an HTTP GET helper and a small workload.

Exit code 77 means SKIP (ctest SKIP_RETURN_CODE).
"""
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
from kasminad import Kasminad  # noqa: E402

SKIP = 77
FAILS = []


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)


def finish(name):
    if FAILS:
        print("%s: %d failure(s)" % (name, len(FAILS)))
        sys.exit(1)
    print("%s: all checks passed" % name)
    sys.exit(0)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


class Daemon(Kasminad):
    """kasminad on tmp/k.sock with the metrics listener on an ephemeral loopback port."""

    def __init__(self, binary, tmp, *extra):
        super().__init__(binary, os.path.join(tmp, "run", "k.sock"),
                         os.path.join(tmp, "kasminad.log"), "--no-cuda", "--no-persist",
                         "--cpu-devices", "2", "--metrics-listen", "127.0.0.1:0", *extra,
                         log_mode="w+", max_receive=None, max_send=None, connect=False)
        self.port = None
        deadline = time.time() + 15
        while time.time() < deadline and (self.port is None or not os.path.exists(self.sock)):
            if self.p.poll() is not None:
                raise SystemExit("kasminad exited early:\n" + self.logtext())
            m = re.search(r"metrics: serving http://127\.0\.0\.1:(\d+)/", self.logtext())
            if m:
                self.port = int(m.group(1))
            time.sleep(0.05)
        if self.port is None:
            raise SystemExit("kasminad did not log its metrics port:\n" + self.logtext())
        self.base = "http://127.0.0.1:%d" % self.port
        self.ch = self.channel()
        grpc.channel_ready_future(self.ch).result(timeout=10)

    def stop(self):
        for ch in self.channels:
            ch.close()
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.close()
        return self.p.returncode


def f32(pb, shape, fill=0.1):
    n = 1
    for s in shape:
        n *= s
    return pb.Tensor(dtype=pb.DTYPE_F32, shape=shape, data=struct.pack("<%df" % n, *([fill] * n)))


def workload(d, pb):
    """Two models on two devices, seeds in different stages and alphas, forwards (allocator and
    cache traffic), a third model with strict gates (G1 passes, RecordMetrics, G2 fails), one
    failing call. Returns {model: [slot ids]}."""
    import grpc
    cnn = pb.CnnHostSpec(num_classes=4, n_blocks=2, base_channels=8, in_channels=3)
    info = d.call("GetServerInfo", pb.GetServerInfoRequest(), pb.ServerInfo)
    bp = "conv_light" if "conv_light" in info.cnn_blueprints else info.cnn_blueprints[0]
    models = {}
    for mid, dev in (("alpha-net", "cpu:0"), ("beta-net", "cpu:1")):
        m = d.call("CreateModel", pb.CreateModelRequest(model_id=mid, cnn=cnn, device=dev,
                                                        permissive_gates=True, init_seed=7),
                   pb.Model)
        models[mid] = [s.slot_id for s in m.slots]
    a_slots = models["alpha-net"]
    # alpha-net: slot 0 TRAINING with alpha 0.375, slot 1 GERMINATED; beta-net: slot 0 TRAINING
    for mid, slot in (("alpha-net", a_slots[0]), ("alpha-net", a_slots[1]),
                      ("beta-net", models["beta-net"][0])):
        d.call("Germinate", pb.GerminateRequest(model_id=mid, slot_id=slot, blueprint_id=bp),
               pb.SlotReport)
    for mid, slot in (("alpha-net", a_slots[0]), ("beta-net", models["beta-net"][0])):
        d.call("AdvanceStage", pb.AdvanceStageRequest(model_id=mid, slot_id=slot),
               pb.AdvanceStageResponse)
    d.call("SetAlpha", pb.SetAlphaRequest(model_id="alpha-net", slot_id=a_slots[0], alpha=0.375),
           pb.SlotReport)
    d.call("SetAlpha", pb.SetAlphaRequest(model_id="beta-net", slot_id=models["beta-net"][0],
                                          alpha=0.8125), pb.SlotReport)
    x = f32(pb, [2, 3, 8, 8])
    for _ in range(3):
        for mid in models:
            d.call("Forward", pb.ForwardRequest(model_id=mid, input=x), pb.ForwardResponse)
    # gamma-net (strict gates): G1 passes (GERMINATED -> TRAINING), RecordMetrics, then G2
    # fails (too few epochs in TRAINING) -- a failed gate is an OK call, counted by the gate counters.
    m = d.call("CreateModel", pb.CreateModelRequest(model_id="gamma-net", cnn=cnn, device="cpu:0",
                                                    init_seed=7), pb.Model)
    models["gamma-net"] = [s.slot_id for s in m.slots]
    g0 = models["gamma-net"][0]
    d.call("Germinate", pb.GerminateRequest(model_id="gamma-net", slot_id=g0, blueprint_id=bp),
           pb.SlotReport)
    r = d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="gamma-net", slot_id=g0),
               pb.AdvanceStageResponse)
    check(r.gate.passed and r.gate.gate == pb.GATE_G1, "gamma-net G1 passes: %s" % r.gate)
    d.call("RecordMetrics", pb.RecordMetricsRequest(model_id="gamma-net", slot_id=g0,
                                                    val_accuracy=62.5,
                                                    counterfactual_contribution=1.25),
           pb.SlotReport)
    r = d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="gamma-net", slot_id=g0),
               pb.AdvanceStageResponse)
    check(not r.gate.passed and r.gate.gate == pb.GATE_G2, "gamma-net G2 fails: %s" % r.gate)
    try:
        d.call("GetModel", pb.GetModelRequest(model_id="no-such-model"), pb.Model)
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, "GetModel of a missing model: NOT_FOUND")
    return models
