#!/usr/bin/python3
"""The Python peer of tests/bench/bench_rpc.c: a grpcio server (Debian's python3-grpcio)
serving the same kasmina.v1 SetAlpha and GetSlotReports over a Unix socket, doing the same
state update a user would otherwise write in Python: clamp alpha into the slot's state under a
lock and answer with the slot's report.

    py_alpha_server.py <python stubs dir> <unix socket path> [workers]
"""
import sys
import threading
from concurrent import futures

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402
from kasmina.v1 import kasmina_pb2_grpc as pbg  # noqa: E402


class Slot:
    def __init__(self, slot_id):
        self.slot_id = slot_id
        self.stage = pb.STAGE_TRAINING
        self.alpha = 0.0
        self.generation = 1

    def report(self, model_id):
        return pb.SlotReport(model_id=model_id, slot_id=self.slot_id, occupied=True,
                             seed_id=self.slot_id + "-conv_light", blueprint_id="conv_light",
                             stage=self.stage, previous_stage=pb.STAGE_GERMINATED,
                             alpha_algorithm=pb.ALPHA_ALGORITHM_ADD,
                             controller=pb.AlphaController(alpha=self.alpha,
                                                           alpha_start=self.alpha,
                                                           alpha_target=self.alpha),
                             blend_tempo_epochs=5, is_healthy=True,
                             model_generation=self.generation)


class Servicer(pbg.KasminaServicer):
    def __init__(self):
        self.lock = threading.Lock()
        self.slots = {s: Slot(s) for s in ("r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2")}

    def SetAlpha(self, req, ctx):
        if req.alpha != req.alpha:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "alpha must be a number in [0, 1]")
        with self.lock:
            s = self.slots.get(req.slot_id)
            if s is None:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown slot_id")
            a = min(max(req.alpha, 0.0), 1.0)
            if a != s.alpha:
                s.alpha = a
                s.generation += 1
            return s.report(req.model_id)

    def GetSlotReports(self, req, ctx):
        with self.lock:
            ids = [req.slot_id] if req.slot_id else sorted(self.slots)
            return pb.SlotReports(slots=[self.slots[i].report(req.model_id) for i in ids])


def main():
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pbg.add_KasminaServicer_to_server(Servicer(), server)
    server.add_insecure_port("unix:" + sys.argv[2])
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


main()
