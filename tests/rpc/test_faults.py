#!/usr/bin/python3
"""Device faults through a real daemon (issue 5): kasminad_faults, the test build of kasminad
whose --fault-injection wraps cpu:0 in a fault-injecting device (tests/helpers/faults.h):

1. OOM: on a device with 64 MiB, a germination that needs more gets RESOURCE_EXHAUSTED naming
   the memory, changes nothing, and the next (smaller) request succeeds.
2. A device that breaks while serving (a sticky error after N op launches): the failing Forward
   gets UNAVAILABLE, health turns NOT_SERVING, SIGTERM still stops the daemon in bounded time,
   and a restart on the same state directory (without the fault) has the state intact.

Usage: test_faults.py <kasminad> <dir with generated stubs>
"""
import os
import struct
import sys
import tempfile
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


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)


class Daemon(Kasminad):
    def __init__(self, tmp, name, *extra):
        super().__init__(BIN, os.path.join(tmp, name, "k.sock"), os.path.join(tmp, name + ".log"),
                         "--no-cuda", *extra, max_receive=None, max_send=None, timeout=60)

    def reports(self, model):
        return self.call("GetSlotReports", pb.GetSlotReportsRequest(model_id=model),
                         pb.SlotReports)

    def stop(self, timeout=20):
        """(exit status, seconds from SIGTERM to the exit)"""
        t0 = time.time()
        rc = super().stop(timeout=timeout)
        return rc, time.time() - t0


def oom(tmp):
    d = Daemon(tmp, "oom", "--no-persist", "--fault-injection", "mem-limit=67108864")
    try:
        # base 256: r0c2 has 1024 channels; conv_heavy there needs 2 x 37.7 MB of weights.
        d.call("CreateModel", pb.CreateModelRequest(
            model_id="big", cnn=pb.CnnHostSpec(base_channels=256, num_classes=10),
            slots=["r0c2"]), pb.Model)
        before = d.reports("big")
        code, msg = d.code("Germinate", pb.GerminateRequest(
            model_id="big", slot_id="r0c2", blueprint_id="conv_heavy"), pb.SlotReport)
        check(code == SC.RESOURCE_EXHAUSTED, "germination beyond device memory is "
              "RESOURCE_EXHAUSTED (%s: %s)" % (code, msg))
        check("memory" in msg, "the message names the memory: " + msg)
        check(d.reports("big") == before, "the refused germination changed nothing")
        code, msg = d.code("Germinate", pb.GerminateRequest(
            model_id="big", slot_id="r0c2", blueprint_id="norm"), pb.SlotReport)
        check(code == SC.OK, "the next, smaller germination succeeds (%s %s)" % (code, msg))
        check(d.health() == health_pb2.HealthCheckResponse.SERVING, "still SERVING after OOM")
        rc, _ = d.stop()
        check(rc == 0, "exit 0")
    finally:
        if d.p.poll() is None:
            d.p.kill()


def sticky(tmp):
    state = os.path.join(tmp, "state")
    d = Daemon(tmp, "sticky", "--state-dir", state, "--fault-injection",
               "sticky-after-launches=400")
    try:
        d.call("CreateModel", pb.CreateModelRequest(
            model_id="m", cnn=pb.CnnHostSpec(base_channels=8, num_classes=10)), pb.Model)
        d.call("Germinate", pb.GerminateRequest(model_id="m", slot_id="r0c1",
                                                blueprint_id="conv_light"), pb.SlotReport)
        d.call("AdvanceStage", pb.AdvanceStageRequest(model_id="m", slot_id="r0c1"),
               pb.AdvanceStageResponse)
        d.call("SetAlpha", pb.SetAlphaRequest(model_id="m", slot_id="r0c1", alpha=0.25),
               pb.SlotReport)
        before = d.reports("m")
        x = pb.Tensor(dtype=pb.DTYPE_F32, shape=[2, 3, 16, 16],
                      data=struct.pack("<%df" % (2 * 3 * 256), *([0.5] * (2 * 3 * 256))))
        code, msg, n = SC.OK, "", 0
        while code == SC.OK and n < 200:
            code, msg = d.code("Forward", pb.ForwardRequest(model_id="m", input=x),
                               pb.ForwardResponse)
            n += 1
        check(code == SC.UNAVAILABLE, "the forward that meets the broken device is UNAVAILABLE "
              "(%s after %d forwards: %s)" % (code, n, msg))
        status = None
        for _ in range(40):
            status = d.health()
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.1)
        check(status == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
        check(d.reports("m") == before, "lifecycle state still readable and unchanged")
        rc, secs = d.stop(timeout=30)
        check(secs < 15, "SIGTERM stops the failed daemon in bounded time (%.1f s)" % secs)
        check(rc == 0, "exit 0 after SIGTERM (rc %s)" % rc)
    finally:
        if d.p.poll() is None:
            d.p.kill()
    d2 = Daemon(tmp, "restart", "--state-dir", state)
    try:
        after = d2.reports("m")
        check(after == before, "after a restart without the fault the state is intact")
        check(d2.health() == health_pb2.HealthCheckResponse.SERVING, "SERVING after restart")
        rc, _ = d2.stop()
        check(rc == 0, "restarted daemon exits 0")
    finally:
        if d2.p.poll() is None:
            d2.p.kill()


def main():
    tmp = tempfile.mkdtemp(prefix="kasmina-faults-")
    oom(tmp)
    sticky(tmp)
    if FAILS:
        for f in sorted(os.listdir(tmp)):
            if f.endswith(".log"):
                print("--- %s ---\n%s" % (f, open(os.path.join(tmp, f)).read()[-3000:]))
        print("rpc_faults: %d checks failed" % len(FAILS))
        sys.exit(1)
    print("rpc_faults: all checks passed")


main()
