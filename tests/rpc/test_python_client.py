"""The Python client against a real kasminad: a full lifecycle (germinate -> advance x4 with
permissive gates and RecordMetrics -> evaluate), and a counterfactual Evaluate whose results equal
the C client's (kasminactl --json, which is libkasmina-client) driving an identical model.

usage: test_python_client.py KASMINAD KASMINACTL   (PYTHONPATH = build/client/python)
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import warnings

import numpy as np

import kasmina_client as kc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
from kasminad import Kasminad  # noqa: E402

KASMINAD, KASMINACTL = sys.argv[1], sys.argv[2]


def batch():
    x = (np.sin(np.arange(4 * 3 * 32 * 32) * 0.37) * 0.5).astype(np.float32).reshape(4, 3, 32, 32)
    y = (np.arange(4) % 10).astype(np.int64)
    return x, y


def save_safetensors(path, tensors):
    import struct
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[a.dtype.name],
                        "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def load_safetensors(path):
    import struct
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        dt = {"F32": "<f4", "I64": "<i8"}[t["dtype"]]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(t["shape"])
    return out


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="ksm-py-")
        cls.sock = os.path.join(cls.tmp, "s.sock")
        cls.daemon = Kasminad(KASMINAD, cls.sock, os.path.join(cls.tmp, "kasminad.log"),
                              "--no-persist", "--cpu-devices", "2", "--log-level", "warn",
                              log_mode="w", connect=False, stdout=False)
        cls.c = kc.Client("unix:" + cls.sock, timeout=30, wait_for_ready=True)
        deadline = time.time() + 20
        while True:
            try:
                if cls.c.health(timeout=2) == "SERVING":
                    break
            except kc.KasminaError:
                pass
            if time.time() > deadline:
                raise RuntimeError("kasminad did not come up")
            time.sleep(0.1)

    @classmethod
    def tearDownClass(cls):
        cls.c.close()
        rc = cls.daemon.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        assert rc == 0, f"kasminad exited {rc}"

    def ctl(self, *args):
        """kasminactl --json ...: the C client."""
        p = subprocess.run([KASMINACTL, "--socket", self.sock, "--json", *args],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, f"kasminactl {args}: {p.stderr}")
        return json.loads(p.stdout) if p.stdout.strip() else None

    # ---- the lifecycle, once through each client ----

    def lifecycle_python(self, m, slot):
        c = self.c
        r = c.germinate(m, slot, "conv_light", init_seed=7)
        self.assertEqual(kc.stage_name(r.stage), "GERMINATED")
        stages = []
        gate, r = c.advance_stage(m, slot)
        self.assertTrue(gate.passed, gate)
        stages.append(kc.stage_name(r.stage))
        for i in range(10):
            r = c.record_metrics(m, slot, val_accuracy=50.0 + i, gradient_health=0.9,
                                 has_exploding=False)
        gate, r = c.advance_stage(m, slot)
        self.assertTrue(gate.passed, gate)
        stages.append(kc.stage_name(r.stage))
        for _ in range(10):
            (r,) = c.step_epoch(m, slot)
        accepted, r = c.set_alpha_target(m, slot, 1.0, steps=2, curve="cosine")
        for _ in range(3):
            (r,) = c.step_epoch(m, slot)
        self.assertAlmostEqual(r.controller.alpha, 1.0, places=6)
        gate, r = c.advance_stage(m, slot)
        self.assertTrue(gate.passed, gate)
        stages.append(kc.stage_name(r.stage))
        c.record_metrics(m, slot, counterfactual_contribution=2.0)
        gate, r = c.advance_stage(m, slot)
        self.assertTrue(gate.passed, gate)
        stages.append(kc.stage_name(r.stage))
        self.assertEqual(stages, ["TRAINING", "BLENDING", "HOLDING", "FOSSILIZED"])
        return r

    def lifecycle_c(self, m, slot):
        self.ctl("germinate", m, slot, "conv_light", "--init-seed", "7")
        self.ctl("advance", m, slot)
        for i in range(10):
            self.ctl("metrics", m, slot, "--val-accuracy", str(50 + i), "--gradient-health",
                     "0.9", "--exploding", "false")
        self.ctl("advance", m, slot)
        for _ in range(10):
            self.ctl("step", m, slot)
        self.ctl("set-alpha-target", m, slot, "1", "--steps", "2", "--curve", "cosine")
        for _ in range(3):
            self.ctl("step", m, slot)
        self.ctl("advance", m, slot)
        self.ctl("metrics", m, slot, "--counterfactual", "2")
        return self.ctl("advance", m, slot)["slot"]

    def test_lifecycle_and_counterfactual_evaluate_equal_the_c_client(self):
        spec = dict(cnn={"num_classes": 10, "base_channels": 8}, permissive_gates=True,
                    init_seed=1)
        mp = self.c.create_model("py", **spec)
        self.ctl("create", "cc", "--cnn", "--classes", "10", "--channels", "8", "--permissive",
                 "--init-seed", "1")
        slot = mp.slots[0].slot_id
        rp = self.lifecycle_python("py", slot)
        rc = self.lifecycle_c("cc", slot)

        # The same slot state through both clients.
        self.assertEqual(kc.stage_name(rp.stage), rc["stage"])
        self.assertEqual(rp.seed_id, rc["seed_id"])
        self.assertAlmostEqual(rp.controller.alpha, rc["controller"]["alpha"], places=6)
        self.assertEqual(rp.metrics.epochs_total, rc["metrics"]["epochs_total"])
        self.assertAlmostEqual(rp.metrics.current_val_accuracy,
                               rc["metrics"]["current_val_accuracy"], places=6)
        self.assertEqual(rp.seed_params, rc["seed_params"])

        # Counterfactual Evaluate: same configs, same numbers.
        x, y = batch()
        path = os.path.join(self.tmp, "batch.safetensors")
        save_safetensors(path, {"input": x, "targets": y})
        ev = self.c.evaluate("py", x, y, configs=[("main", {}), ("without", {slot: 0.0})],
                             return_logits=True)
        self.assertEqual([r.name for r in ev.results], ["main", "without"])
        logits_path = os.path.join(self.tmp, "logits.safetensors")
        jc = self.ctl("evaluate", "cc", "--input", path, "--targets", path, "--config", "main",
                      "--config", f"without:{slot}=0", "--logits", logits_path)
        for rp_, rc_ in zip(ev.results, jc["results"]):
            self.assertEqual(rp_.name, rc_["name"])
            self.assertEqual(rp_.correct, rc_["correct"])
            self.assertEqual(rp_.total, rc_["total"])
            self.assertAlmostEqual(rp_.loss, rc_["loss"], delta=1e-6 * max(1, abs(rp_.loss)))
            self.assertAlmostEqual(rp_.accuracy, rc_["accuracy"], places=6)
        logits_c = load_safetensors(logits_path)
        for r in ev.results:
            self.assertEqual(r.logits.shape, (4, 10))
            np.testing.assert_allclose(r.logits, logits_c[r.name], rtol=0, atol=1e-6)

        # Standard set and the forward: equal as well.
        std_p = self.c.evaluate("py", x, y, generate_standard=True)
        std_c = self.ctl("evaluate", "cc", "--input", path, "--targets", path, "--standard")
        self.assertEqual([r.name for r in std_p.results], [r["name"] for r in std_c["results"]])
        out_p = self.c.forward("py", x)
        out_path = os.path.join(self.tmp, "out.safetensors")
        self.ctl("forward", "cc", "--input", path + ":input", "--output", out_path)
        np.testing.assert_allclose(out_p, load_safetensors(out_path)["output"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out_p, ev.results[0].logits, rtol=0, atol=1e-6)
        fused = self.c.fused_forward("py", x, {slot: [1, 1, 0, 0]})
        self.assertEqual(fused.shape, (4, 10))
        np.testing.assert_allclose(fused[:2], out_p[:2], rtol=0, atol=1e-5)

        # The event stream saw the four stage changes of each model, in order.
        events = list(self.c.watch_events("py", timeout=0.5))
        seq = [e.sequence for e in events]
        self.assertEqual(seq, sorted(seq))
        to = [kc.stage_name(e.to_stage) for e in events if e.event_type == "SEED_STAGE_CHANGED"]
        for s in ["TRAINING", "BLENDING", "HOLDING", "FOSSILIZED"]:
            self.assertIn(s, to)

    def test_warnings_reach_python(self):
        c = self.c
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = c.create_model("warned", cnn={"num_classes": 4, "n_blocks": 2,
                                              "base_channels": 8})
            slot = m.slots[0].slot_id
            c.germinate("warned", slot, "conv_light")
            c.record_metrics("warned", slot, val_accuracy=55.0)
            quiet = len(w)
            c.record_metrics("warned", slot, val_accuracy=0.55)
        got = [str(x.message) for x in w if issubclass(x.category, kc.KasminaWarning)]
        self.assertEqual(quiet, 1, got)  # CreateModel: the defaults taken
        self.assertIn("took kernel_size=3, in_channels=3", got[0])
        self.assertEqual(len(got), 2, got)
        self.assertTrue(got[1].startswith("RecordMetrics: val_accuracy 0.55 looks like a fraction"),
                        got[1])
        c.delete_model("warned")

    def test_other_rpcs_and_errors(self):
        c = self.c
        info = c.server_info()
        self.assertEqual(info.name, "kasminad")
        self.assertGreaterEqual(len(info.devices), 2)
        m = c.create_model("other", cnn={"base_channels": 8}, init_seed=3)
        self.assertIn("other", [x.model_id for x in c.list_models()])
        self.assertEqual(c.get_model("other").model_id, "other")
        slot = m.slots[0].slot_id
        self.assertFalse(c.slot_reports("other")[0].occupied)
        c.germinate("other", slot, "conv_light")
        self.assertAlmostEqual(c.set_alpha("other", slot, 0.25).controller.alpha, 0.25, places=6)
        c.schedule_prune("other", slot, steps=2, curve="linear", reason="test")
        c.prune("other", slot, reason="test", initiator="py")
        blob = c.export_weights("other")
        self.assertGreater(len(blob), 8)
        res = c.load_weights("other", blob, strict=True)
        self.assertGreater(len(res.loaded), 0)
        self.assertEqual(c.move_model("other", device="cpu:1").device, "cpu:1")
        self.assertGreaterEqual(len(c.memory_stats()), 2)
        self.assertIsInstance(c.cache_stats("other"), list)
        self.assertGreaterEqual(len(c.empty_cache()), 2)
        with self.assertRaises(kc.KasminaError) as cm:
            c.get_model("nope")
        self.assertEqual(cm.exception.code.name, "NOT_FOUND")
        self.assertEqual(cm.exception.ksm_error, "KSM_ENOMODEL")
        with self.assertRaises(kc.KasminaError) as cm:
            c.germinate("other", "r9c9", "conv_light")
        self.assertEqual(cm.exception.code.name, "INVALID_ARGUMENT")
        self.assertGreater(c.delete_model("other"), -1)


if __name__ == "__main__":
    sys.argv[1:] = sys.argv[3:]
    sys.exit(0 if unittest.main(exit=False, verbosity=2).result.wasSuccessful() else 1)
