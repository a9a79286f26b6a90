#!/usr/bin/python3
"""Writes the seed corpora of tests/fuzz/corpus/{rpc,safetensors,config}.

    /usr/bin/python3 tests/fuzz/gen_corpus.py build/kasminad build/client/python

Every rpc seed is also sent to a real kasminad (the same two models as fuzz_rpc: "cnn" and "tf",
recreated before each seed) and must succeed there, so the seeds are valid requests that reach
the engine. The output is deterministic; re-running it must leave git clean.

rpc seed format (tests/fuzz/fuzz_rpc.c): up to 16 records [method index u8][length u16 LE][request];
METHODS below is daemon/rpc/calls.c's rpc_methods order.
"""
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

BIN, PYDIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, PYDIR)
import grpc  # noqa: E402
from kasmina.v1 import kasmina_pb2 as pb  # noqa: E402
import health_pb2  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["GetServerInfo", "CreateModel", "GetModel", "ListModels", "DeleteModel",
           "LoadWeights", "ExportWeights", "MoveModel", "Germinate", "AdvanceStage", "Prune",
           "SchedulePrune", "SetAlphaTarget", "SetAlpha", "StepEpoch", "RecordMetrics",
           "GetSlotReports", "WatchEvents", "Forward", "FusedForward", "Evaluate",
           "GetMemoryStats", "GetCacheStats", "EmptyCache", "Health/Check", "Health/Watch"]
RESP = {"GetServerInfo": pb.ServerInfo, "CreateModel": pb.Model, "GetModel": pb.Model,
        "ListModels": pb.ListModelsResponse, "DeleteModel": pb.DeleteModelResponse,
        "LoadWeights": pb.LoadWeightsResponse, "ExportWeights": pb.ExportWeightsResponse,
        "MoveModel": pb.Model, "Germinate": pb.SlotReport,
        "AdvanceStage": pb.AdvanceStageResponse, "Prune": pb.PruneResponse,
        "SchedulePrune": pb.PruneResponse, "SetAlphaTarget": pb.SetAlphaTargetResponse,
        "SetAlpha": pb.SlotReport, "StepEpoch": pb.StepEpochResponse,
        "RecordMetrics": pb.SlotReport, "GetSlotReports": pb.SlotReports,
        "Forward": pb.ForwardResponse, "FusedForward": pb.ForwardResponse,
        "Evaluate": pb.EvaluateResponse, "GetMemoryStats": pb.MemoryStats,
        "GetCacheStats": pb.CacheStats, "EmptyCache": pb.MemoryStats}

CNN = pb.CreateModelRequest(model_id="cnn", cnn=pb.CnnHostSpec(base_channels=4, num_classes=5),
                            init_seed=7, device="cpu:0")
TF = pb.CreateModelRequest(model_id="tf", transformer=pb.TransformerHostSpec(
    vocab_size=16, n_embd=8, n_head=2, n_layer=2, block_size=8, num_segments=2),
    init_seed=7, device="cpu:0")


def f32(shape, vals=None):
    n = 1
    for s in shape:
        n *= s
    vals = vals or [((i * 37) % 17 - 8) / 8.0 for i in range(n)]
    return pb.Tensor(dtype=pb.DTYPE_F32, shape=shape, data=struct.pack("<%df" % n, *vals))


def i64(vals, shape):
    return pb.Tensor(dtype=pb.DTYPE_I64, shape=shape, data=struct.pack("<%dq" % len(vals), *vals))


X_CNN = f32([2, 3, 8, 8])
X_TF = i64([1, 2, 3, 4, 5, 6, 7, 8], [2, 4])


class Daemon:
    def __init__(self, tmp):
        self.sock = os.path.join(tmp, "k.sock")
        self.p = subprocess.Popen([BIN, "--listen", "unix:" + self.sock, "--cpu-devices", "2",
                                   "--no-cuda", "--log-level", "warn"])
        for _ in range(200):
            if os.path.exists(self.sock):
                break
            time.sleep(0.05)
        self.ch = grpc.insecure_channel("unix:" + self.sock,
                                        options=[("grpc.max_receive_message_length", 64 << 20)])
        grpc.channel_ready_future(self.ch).result(timeout=10)

    def call(self, method, req):
        if method.startswith("Health/"):
            f = self.ch.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        elif method == "WatchEvents":
            return None  # a stream: the seed is checked by unpacking only
        else:
            f = self.ch.unary_unary("/kasmina.v1.Kasmina/" + method,
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=RESP[method].FromString)
        return f(req, timeout=30)

    def reset(self):
        for m in self.call("ListModels", pb.ListModelsRequest()).models:
            self.call("DeleteModel", pb.DeleteModelRequest(model_id=m.model_id))
        self.call("CreateModel", CNN)
        self.call("CreateModel", TF)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=30)


def record(method, req):
    b = req.SerializeToString()
    assert len(b) < 0xFFFF, method
    return struct.pack("<BH", METHODS.index(method), len(b)) + b


def weights_for_fuzzer(blob, model, strict):
    """Re-pads a safetensors header (trailing spaces) so that fuzz_safetensors' first byte picks
    model (bit 0) and strict (bit 1)."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = blob[8:8 + n].rstrip(b" ")
    while (len(header) & 3) != (model | strict << 1):
        header += b" "
    return struct.pack("<Q", len(header)) + header + blob[8 + n:]


def config_seeds(out):
    """fuzz_config input: [file text] NUL [token] NUL ... (KASMINA_X=v tokens are environment)."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with open(os.path.join(HERE, "..", "..", "deploy", "kasminad.conf"), "rb") as f:
        sample = f.read()
    seeds = {
        "sample_conf": sample,
        "argv_all": b"\0" + b"\0".join([
            b"--listen", b"unix:/tmp/k.sock", b"--listen", b"127.0.0.1:5051",
            b"--allow-remote-tcp", b"--state-dir", b"/tmp/st", b"--metrics-listen", b":9090",
            b"--cpu-devices", b"2", b"--no-cuda", b"--memory-cap", b"512MiB", b"--log-level",
            b"debug", b"--log-file", b"/tmp/k.log", b"--max-message-bytes", b"4M",
            b"--drain-timeout", b"2.5", b"--workers", b"8", b"--max-concurrent-calls", b"64",
            b"--event-ring", b"128", b"--subscriber-buffer", b"64", b"--demo"]),
        "file_env_argv": b"workers 3\nlisten 127.0.0.1:0\nno-persist\n# comment\n\0"
                         b"KASMINA_LISTEN=unix:/a.sock,unix:/b.sock\0KASMINA_MEMORY_CAP=1G\0"
                         b"--log-level\0warn",
        "bad_range": b"cpu-devices 99\n",
        "bad_exclusive": b"\0--state-dir\0/tmp/s\0--no-persist",
        "help": b"\0--help",
        "fault_injection": b"\0--fault-injection\0mem-limit=1048576",
        "version": b"\0--version",
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return len(seeds)


def main():
    n_config = config_seeds(os.path.join(HERE, "corpus", "config"))
    out_rpc = os.path.join(HERE, "corpus", "rpc")
    out_st = os.path.join(HERE, "corpus", "safetensors")
    for d in (out_rpc, out_st):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    tmp = tempfile.mkdtemp(prefix="ksm-fuzz-gen-")
    d = Daemon(tmp)
    try:
        d.reset()
        cnn_slot = d.call("GetModel", pb.GetModelRequest(model_id="cnn")).slots[1].slot_id
        tf_slot = d.call("GetModel", pb.GetModelRequest(model_id="tf")).slots[0].slot_id
        germ_cnn = ("Germinate", pb.GerminateRequest(model_id="cnn", slot_id=cnn_slot,
                                                     blueprint_id="conv_light", init_seed=3))
        germ_tf = ("Germinate", pb.GerminateRequest(model_id="tf", slot_id=tf_slot,
                                                    blueprint_id="lora", init_seed=3))
        adv_cnn = ("AdvanceStage", pb.AdvanceStageRequest(model_id="cnn", slot_id=cnn_slot))
        fwd_cnn = ("Forward", pb.ForwardRequest(model_id="cnn", input=X_CNN))
        fwd_tf = ("Forward", pb.ForwardRequest(model_id="tf", input=X_TF, stream="s1"))

        # Weights of both models with a live seed, for LoadWeights and fuzz_safetensors.
        d.call(*germ_cnn)
        d.call(*germ_tf)
        w_cnn = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="cnn")).safetensors
        w_tf = d.call("ExportWeights", pb.ExportWeightsRequest(model_id="tf")).safetensors
        for name, blob, model in (("cnn", w_cnn, 0), ("tf", w_tf, 1)):
            for strict in (0, 1):
                with open(os.path.join(out_st, "weights_%s%s" % (name, "_strict" * strict)),
                          "wb") as f:
                    f.write(weights_for_fuzzer(blob, model, strict))

        seeds = {
            "server_info": [("GetServerInfo", pb.GetServerInfoRequest())],
            "create_cnn": [("CreateModel", pb.CreateModelRequest(
                model_id="c2", cnn=pb.CnnHostSpec(base_channels=4, n_blocks=2, num_classes=3,
                                                  in_channels=1, kernel_size=3, pool_layers=1),
                slots=["r0c0"], init_seed=1, permissive_gates=True,
                auto_forward_gates=[pb.GATE_G1]))],
            "create_tf": [("CreateModel", pb.CreateModelRequest(
                model_id="t2", transformer=pb.TransformerHostSpec(
                    vocab_size=8, n_embd=4, n_head=1, n_layer=1, block_size=4, num_segments=1),
                device="cpu:1"))],
            "get_model": [("GetModel", pb.GetModelRequest(model_id="cnn"))],
            "list_models": [("ListModels", pb.ListModelsRequest())],
            "delete_model": [("DeleteModel", pb.DeleteModelRequest(model_id="tf")),
                             ("GetModel", pb.GetModelRequest(model_id="cnn"))],
            "load_weights_cnn": [germ_cnn, ("LoadWeights", pb.LoadWeightsRequest(
                model_id="cnn", safetensors=w_cnn, strict=True))],
            "load_weights_tf": [("LoadWeights", pb.LoadWeightsRequest(
                model_id="tf", safetensors=w_tf, strict=False))],
            "export_weights": [("ExportWeights", pb.ExportWeightsRequest(model_id="tf"))],
            "move_model": [("MoveModel", pb.MoveModelRequest(model_id="cnn", device="cpu:1",
                                                             dtype=pb.DTYPE_F32)), fwd_cnn],
            "germinate_cnn": [germ_cnn],
            "germinate_tf_gated": [("Germinate", pb.GerminateRequest(
                model_id="tf", slot_id=tf_slot, blueprint_id="lora", seed_id="s-gated",
                blend_algorithm_id="gated", blend_tempo_epochs=3, alpha_target=0.5,
                alpha_algorithm=pb.ALPHA_ALGORITHM_GATE))],
            "advance": [germ_cnn, adv_cnn, ("AdvanceStage", pb.AdvanceStageRequest(
                model_id="cnn", slot_id=cnn_slot, target=pb.STAGE_BLENDING))],
            "prune": [germ_cnn, ("Prune", pb.PruneRequest(model_id="cnn", slot_id=cnn_slot,
                                                          reason="fuzz", initiator="policy"))],
            "schedule_prune": [germ_tf, ("AdvanceStage", pb.AdvanceStageRequest(
                model_id="tf", slot_id=tf_slot)), ("SchedulePrune", pb.SchedulePruneRequest(
                    model_id="tf", slot_id=tf_slot, steps=3, curve=pb.ALPHA_CURVE_COSINE,
                    steepness=4.0, reason="fuzz"))],
            # A permissive model of its own: gates pass, so the slot reaches BLENDING.
            "set_alpha_target": [("CreateModel", pb.CreateModelRequest(
                model_id="p", cnn=pb.CnnHostSpec(base_channels=4, n_blocks=2),
                permissive_gates=True)),
                ("Germinate", pb.GerminateRequest(model_id="p", slot_id="r0c0",
                                                  blueprint_id="norm", blend_tempo_epochs=1)),
                ("AdvanceStage", pb.AdvanceStageRequest(model_id="p", slot_id="r0c0")),
                ] + [("RecordMetrics", pb.RecordMetricsRequest(
                    model_id="p", slot_id="r0c0", val_accuracy=40.0 + i,
                    gradients=pb.GradientStats(gradient_norm=0.5, gradient_health=0.9)))
                     for i in range(10)] +
                [("AdvanceStage", pb.AdvanceStageRequest(model_id="p", slot_id="r0c0",
                                                         target=pb.STAGE_BLENDING)),
                ("StepEpoch", pb.StepEpochRequest(model_id="p")),
                ("SetAlphaTarget", pb.SetAlphaTargetRequest(
                    model_id="p", slot_id="r0c0", alpha_target=0.75, steps=4,
                    curve=pb.ALPHA_CURVE_SIGMOID, steepness=8.0))],
            "set_alpha": [germ_cnn, adv_cnn, ("SetAlpha", pb.SetAlphaRequest(
                model_id="cnn", slot_id=cnn_slot, alpha=0.5)), fwd_cnn],
            "step_epoch": [germ_cnn, adv_cnn, ("StepEpoch", pb.StepEpochRequest(model_id="cnn")),
                           ("StepEpoch", pb.StepEpochRequest(model_id="cnn", slot_id=cnn_slot))],
            "record_metrics": [germ_cnn, ("RecordMetrics", pb.RecordMetricsRequest(
                model_id="cnn", slot_id=cnn_slot, val_accuracy=51.5,
                counterfactual_contribution=1.25, epoch=2, max_epochs=10,
                gradients=pb.GradientStats(gradient_norm=0.5, gradient_health=0.9)))],
            "slot_reports": [germ_tf, ("GetSlotReports", pb.GetSlotReportsRequest(model_id="tf"))],
            "watch_events": [("WatchEvents", pb.WatchEventsRequest(model_id="cnn",
                                                                   after_sequence=1))],
            "forward_cnn": [fwd_cnn],
            "forward_tf_bf16": [germ_tf, ("Forward", pb.ForwardRequest(
                model_id="tf", input=i64([0, 15, 3, 2], [1, 4]), output_dtype=pb.DTYPE_BF16))],
            "forward_tf_i32": [("Forward", pb.ForwardRequest(model_id="tf", input=pb.Tensor(
                dtype=pb.DTYPE_I32, shape=[1, 3], data=struct.pack("<3i", 1, 2, 3)),
                output_dtype=pb.DTYPE_F16))],
            "fused_forward": [germ_cnn, adv_cnn, ("FusedForward", pb.FusedForwardRequest(
                model_id="cnn", input=X_CNN, stream="k1",
                overrides=[pb.AlphaOverride(slot_id=cnn_slot, alpha=[0.0, 1.0])]))],
            "evaluate_cnn": [germ_cnn, adv_cnn, ("Evaluate", pb.EvaluateRequest(
                model_id="cnn", input=X_CNN, targets=i64([1, 4], [2]), generate_standard=True,
                return_logits=True))],
            "evaluate_tf": [germ_tf, ("Evaluate", pb.EvaluateRequest(
                model_id="tf", input=X_TF, targets=i64([2, 3, 4, 5, 6, 7, 8, 9], [2, 4]),
                configs=[pb.AlphaConfig(name="off", alpha={tf_slot: 0.0}),
                         pb.AlphaConfig(name="main")]))],
            "memory_stats": [fwd_tf, ("GetMemoryStats", pb.GetMemoryStatsRequest(device="cpu:0"))],
            "cache_stats": [fwd_cnn, fwd_tf, ("GetCacheStats", pb.GetCacheStatsRequest()),
                            ("GetCacheStats", pb.GetCacheStatsRequest(model_id="cnn"))],
            "empty_cache": [fwd_cnn, ("EmptyCache", pb.EmptyCacheRequest())],
            "health": [("Health/Check", health_pb2.HealthCheckRequest(
                service="kasmina.v1.Kasmina"))],
        }
        for name, calls in sorted(seeds.items()):
            d.reset()
            data = b""
            for method, req in calls:
                try:
                    d.call(method, req)
                except grpc.RpcError as e:
                    raise SystemExit("seed %s: %s failed: %s %s" % (name, method, e.code(),
                                                                     e.details()))
                data += record(method, req)
            with open(os.path.join(out_rpc, name), "wb") as f:
                f.write(data)
        print("gen_corpus: %d rpc, 4 safetensors and %d config seeds" % (len(seeds), n_config))
    finally:
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
