"""Evaluate's attribution over the wire (docs/evaluate.md#attribution), against a real kasminad:

- EXACT over three live seeds equals the test's own computation from the eight coalition values,
  measured with explicit per-config alphas (one config per coalition): Shapley values as the
  mean over all 3! orderings, marginals, every pairwise interaction. The C client (kasminactl
  --json evaluate --attribution exact) reports the same numbers.
- PERMUTATION equals a transcription of esper's CounterfactualEngine (_generate_shapley_configs,
  compute_shapley_values) on random.Random(seed), fed the measured coalition values: mean, std,
  n_samples, for 3 and 4 live seeds and two seeds (a 64-bit one too).
- Refusals: no live seed (FAILED_PRECONDITION), EXACT over 9 live seeds and 2^8 coalitions plus a
  config over 2^20 rows (RESOURCE_EXHAUSTED), a bad mode or too many samples (INVALID_ARGUMENT).

usage: test_attribution.py KASMINAD KASMINACTL   (PYTHONPATH = build/client/python)
"""
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import grpc
import numpy as np

import kasmina_client as kc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helpers"))
from kasminad import Kasminad  # noqa: E402

KASMINAD, KASMINACTL = sys.argv[1], sys.argv[2]
B = 32


def batch():
    """Noise on a per-row, per-channel level, so the rows' predictions differ."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-0.5, 0.5, (B, 3, 16, 16)).astype(np.float32)
    rows = np.arange(B, dtype=np.float32)[:, None, None, None]
    ch = np.arange(3, dtype=np.float32)[None, :, None, None]
    return (x + 2.0 * np.sin(0.7 * rows + 1.9 * ch)).astype(np.float32)


def perturb(blob, seed):
    """Noise on every F32 weight and bias of a safetensors blob (seeds start near the
    identity)."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    out = bytearray(blob)
    rng = np.random.default_rng(seed)
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        if not (name.endswith(".weight") or name.endswith(".bias")):
            continue
        a, b = t["data_offsets"]
        w = np.frombuffer(bytes(out[8 + n + a:8 + n + b]), "<f4")
        w = (w + rng.uniform(-2, 2, w.shape)).astype("<f4")
        out[8 + n + a:8 + n + b] = w.tobytes()
    return bytes(out)


def save_safetensors(path, tensors):
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


def bits(c, n):
    return "".join("1" if c >> j & 1 else "0" for j in range(n))


# ---- references ----

def shapley_by_orderings(v, n):
    phi = [0.0] * n
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        s = 0
        for j in order:
            phi[j] += v[s | 1 << j] - v[s]
            s |= 1 << j
    return [p / len(orders) for p in phi], len(orders)


def esper_permutation(v, n, samples, seed):
    """esper's CounterfactualEngine with strategy "shapley" (counterfactual.py), transcribed:
    the configs it asks for, then compute_shapley_values over exactly those."""
    rng = random.Random(seed)
    configs = [tuple(True for _ in range(n))]
    configs += [tuple(j != i for j in range(n)) for i in range(n)]
    configs.append(tuple(False for _ in range(n)))
    seen = set(configs)
    for _ in range(samples // 2):
        perm = list(range(n))
        rng.shuffle(perm)
        for order in (perm, perm[::-1]):
            for k in range(n + 1):
                cfg = tuple(i in order[:k] for i in range(n))
                if cfg not in seen:
                    configs.append(cfg)
                    seen.add(cfg)
    lookup = {cfg: v[sum(1 << j for j in range(n) if cfg[j])] for cfg in configs}
    marginals = [[] for _ in range(n)]
    for _ in range(min(100, samples)):
        perm = list(range(n))
        rng.shuffle(perm)
        for i, j in enumerate(perm):
            before = tuple(k in set(perm[:i]) for k in range(n))
            after = tuple(k in set(perm[:i + 1]) for k in range(n))
            if before in lookup and after in lookup:
                marginals[j].append(lookup[after] - lookup[before])
    out = []
    for vals in marginals:
        if not vals:
            out.append((0.0, 0.0, 0))
            continue
        mean = sum(vals) / len(vals)
        var = sum((x - mean) ** 2 for x in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        out.append((mean, var ** 0.5, len(vals)))
    return out


class AttributionTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="ksm-attr-")
        cls.sock = os.path.join(cls.tmp, "s.sock")
        cls.daemon = Kasminad(KASMINAD, cls.sock, os.path.join(cls.tmp, "kasminad.log"),
                              "--no-persist", "--cpu-devices", "1", "--log-level", "warn",
                              log_mode="w", connect=False, stdout=False)
        cls.c = kc.Client("unix:" + cls.sock, timeout=60, wait_for_ready=True)
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
        p = subprocess.run([KASMINACTL, "--socket", self.sock, "--json", *args],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, f"kasminactl {args}: {p.stderr}")
        return json.loads(p.stdout)

    def seed(self, m, slot, bp, alpha, algorithm=None):
        self.c.germinate(m, slot, bp, alpha_algorithm=algorithm, init_seed=11)
        gate, r = self.c.advance_stage(m, slot)
        self.assertEqual(kc.stage_name(r.stage), "TRAINING")
        if alpha:
            self.c.set_alpha(m, slot, alpha)

    def coalition_values(self, m, live, x, y, logits=False):
        """Every coalition c as an explicit config: live seed j at 1.0 iff bit j of c."""
        n = len(live)
        cfgs = [(bits(c, n), {s: float(c >> j & 1) for j, s in enumerate(live)})
                for c in range(1 << n)]
        return self.c.evaluate(m, x, y, configs=cfgs, return_logits=logits)

    def test_exact_and_permutation_equal_the_references(self):
        c, m = self.c, "attr"
        c.create_model(m, cnn={"base_channels": 8}, init_seed=7, permissive_gates=True)
        live = ["r0c0", "r0c1", "r1c1"]  # row-major
        self.seed(m, "r0c0", "conv_light", 0.7)
        self.seed(m, "r0c1", "conv_small", 0.55)
        self.seed(m, "r1c1", "bottleneck", 0.4, algorithm="multiply")
        self.seed(m, "r1c0", "norm", 0.0)  # TRAINING at alpha 0: not live
        c.load_weights(m, perturb(c.export_weights(m), 4), strict=True)
        x = batch()
        # Labels that make coalitions differ: row b is labelled by coalition b % 8's argmax.
        y0 = np.zeros(B, np.int64)
        ev = self.coalition_values(m, live, x, y0, logits=True)
        preds = [np.argmax(r.logits, axis=1) for r in ev.results]
        y = np.array([preds[b % 8][b] for b in range(B)], np.int64)
        v = [r.accuracy for r in self.coalition_values(m, live, x, y).results]
        for j, s in enumerate(live):
            self.assertTrue(any(v[k | 1 << j] != v[k] for k in range(8)),
                            f"seed {s} changes no coalition's accuracy: {v}")

        # EXACT, with the standard configs in the same pass.
        ex = c.evaluate(m, x, y, generate_standard=True, attribution="exact")
        std = c.evaluate(m, x, y, generate_standard=True)
        self.assertEqual([r.name for r in ex.results], [r.name for r in std.results])
        self.assertEqual([r.correct for r in ex.results], [r.correct for r in std.results])
        phi, nperm = shapley_by_orderings(v, 3)
        self.assertEqual([e.slot_id for e in ex.shapley], live)
        for j, e in enumerate(ex.shapley):
            self.assertAlmostEqual(e.mean, phi[j], delta=1e-9)
            self.assertEqual(e.std, 0.0)
            self.assertEqual(e.n_samples, nperm)
            self.assertEqual(e.algorithm, "exact")
            self.assertAlmostEqual(e.marginal, v[7] - v[7 & ~(1 << j)], delta=1e-9)
        pairs = [(a, b) for a in range(3) for b in range(a + 1, 3)]
        self.assertEqual([(t.slot_a, t.slot_b) for t in ex.interactions],
                         [(live[a], live[b]) for a, b in pairs])
        for t, (a, b) in zip(ex.interactions, pairs):
            want = v[1 << a | 1 << b] - v[1 << a] - v[1 << b] + v[0]
            self.assertAlmostEqual(t.interaction, want, delta=1e-9)
        self.assertEqual([e.algorithm for e in c.evaluate(m, x, y, attribution="auto").shapley],
                         ["exact"] * 3)

        # The C client: the same numbers.
        path = os.path.join(self.tmp, "batch.safetensors")
        save_safetensors(path, {"input": x, "targets": y})
        jc = self.ctl("evaluate", m, "--input", path, "--targets", path, "--attribution", "exact")
        self.assertEqual([r["name"] for r in jc["results"]], ["main"])
        for e, je in zip(ex.shapley, jc["shapley"]):
            self.assertEqual(e.slot_id, je["slot_id"])
            self.assertAlmostEqual(e.mean, je["mean"], delta=1e-9)
            self.assertAlmostEqual(e.marginal, je["marginal"], delta=1e-9)
            self.assertEqual(e.n_samples, je["n_samples"])
        self.assertEqual(len(jc["interactions"]), 3)
        for t, jt in zip(ex.interactions, jc["interactions"]):
            self.assertAlmostEqual(t.interaction, jt["interaction"], delta=1e-9)

        # PERMUTATION: esper's engine on the measured values.
        for samples, seed in [(20, 12345), (6, 2**63 + 5)]:
            pe = c.evaluate(m, x, y, attribution="permutation", shapley_samples=samples,
                            attribution_seed=seed)
            self.assertEqual(pe.interactions, [])
            ref = esper_permutation(v, 3, samples, seed)
            for j, e in enumerate(pe.shapley):
                self.assertEqual(e.algorithm, "permutation_antithetic")
                self.assertEqual(e.n_samples, ref[j][2], f"{live[j]} samples={samples}")
                self.assertAlmostEqual(e.mean, ref[j][0], delta=1e-9)
                self.assertAlmostEqual(e.std, ref[j][1], delta=1e-9)
                self.assertAlmostEqual(e.marginal, v[7] - v[7 & ~(1 << j)], delta=1e-9)
        jp = self.ctl("evaluate", m, "--input", path, "--targets", path, "--attribution",
                      "permutation", "--shapley-samples", "20", "--attribution-seed", "12345")
        ref = esper_permutation(v, 3, 20, 12345)
        for j, je in enumerate(jp["shapley"]):
            self.assertAlmostEqual(je["mean"], ref[j][0], delta=1e-9)
            self.assertEqual(je["n_samples"], ref[j][2])

        # A fourth live seed and few samples: not every coalition is planned, so which
        # marginals count depends on esper's generator.
        self.seed(m, "r1c2", "conv_light", 0.6)
        c.load_weights(m, perturb(c.export_weights(m), 9), strict=True)
        live4 = ["r0c0", "r0c1", "r1c1", "r1c2"]
        v4 = [r.accuracy for r in self.coalition_values(m, live4, x, y).results]
        self.assertGreater(len(set(v4)), 2, v4)
        for samples, seed in [(3, 7), (8, 2**40 + 1)]:
            pe = c.evaluate(m, x, y, attribution="permutation", shapley_samples=samples,
                            attribution_seed=seed)
            ref = esper_permutation(v4, 4, samples, seed)
            self.assertEqual([e.slot_id for e in pe.shapley], live4)
            for j, e in enumerate(pe.shapley):
                self.assertEqual(e.n_samples, ref[j][2], f"{live4[j]} samples={samples}")
                self.assertAlmostEqual(e.mean, ref[j][0], delta=1e-9)
                self.assertAlmostEqual(e.std, ref[j][1], delta=1e-9)

    def test_refusals(self):
        c = self.c
        x = batch()[:2]
        y = np.array([1, 2], np.int64)
        c.create_model("none", cnn={"base_channels": 4}, init_seed=1)
        with self.assertRaises(kc.KasminaError) as e:
            c.evaluate("none", x, y, attribution="exact")
        self.assertEqual(e.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("live seed", e.exception.details)
        with self.assertRaises(kc.KasminaError) as e:
            c.evaluate("none", x, y, attribution=7)
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("attribution", e.exception.details)
        with self.assertRaises(kc.KasminaError) as e:
            c.evaluate("none", x, y, attribution="permutation", shapley_samples=1001)
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("shapley_samples", e.exception.details)
        # No configs, no standard set, no attribution: the client sends "main" (the model as it
        # is, like kasminactl); the daemon refuses an empty request.
        self.assertEqual([r.name for r in c.evaluate("none", x, y).results], ["main"])
        with self.assertRaises(grpc.RpcError) as e:
            c._stub.Evaluate(kc.pb.EvaluateRequest(model_id="none", input=kc.tensor_from_numpy(x),
                                                   targets=kc.tensor_from_numpy(y)))
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

        # Nine live seeds on 1x1 images.
        c.create_model("wide", cnn={"n_blocks": 9, "base_channels": 1, "pool_layers": 0,
                                    "in_channels": 1}, init_seed=2)
        slots = [f"r0c{i}" for i in range(9)]
        for s in slots:
            self.seed("wide", s, "conv_light", 0.5)
        xs = np.linspace(-1, 1, 4, dtype=np.float32).reshape(4, 1, 1, 1)
        ys = np.array([0, 1, 2, 3], np.int64)
        with self.assertRaises(kc.KasminaError) as e:
            c.evaluate("wide", xs, ys, attribution="exact")
        self.assertEqual(e.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("at most 8 live seeds", e.exception.details)
        auto = c.evaluate("wide", xs, ys, attribution="auto")
        self.assertEqual([s.slot_id for s in auto.shapley], slots)
        self.assertEqual({s.algorithm for s in auto.shapley}, {"permutation_antithetic"})
        # Eight live (one back at alpha 0): 2^8 coalitions + main x 4096 rows > 2^20.
        c.set_alpha("wide", "r0c8", 0.0)
        ok = c.evaluate("wide", xs, ys, configs=[("main", {})], attribution="exact")
        self.assertEqual(len(ok.shapley), 8)
        self.assertEqual(len(ok.interactions), 28)
        big_x = np.zeros((4096, 1, 1, 1), np.float32)
        big_y = np.zeros(4096, np.int64)
        with self.assertRaises(kc.KasminaError) as e:
            c.evaluate("wide", big_x, big_y, configs=[("main", {})], attribution="exact")
        self.assertEqual(e.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("256 attribution coalitions", e.exception.details)
        self.assertIn("1048576 rows", e.exception.details)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
