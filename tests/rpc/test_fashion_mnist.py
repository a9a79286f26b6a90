#!/usr/bin/python3
"""The Fashion-MNIST example (client/python/examples/fashion_mnist.py), short: a real kasminad
spawned by the example, base-8 host, 26 epochs of 10 TrainSteps of 32 images (260 steps), strict
gates. It must run the whole lifecycle through the daemon and its loss must fall:

- exit status 0 with --require-fossilized;
- the train loss of the last three epochs is below 80 % of the first epoch's, and the test
  accuracy ends above its first value;
- r1c1 goes GERMINATED -> TRAINING -> BLENDING -> HOLDING -> FOSSILIZED in that order, through
  G1, G2 (strict: with the gradient ratio that RecordMetrics(use_collected_gradients) folded,
  "seed_gradient_active_X"), G3 and G5 (a measured contribution);
- alpha is 0 through TRAINING, never falls during BLENDING, and reaches 1.0;
- every epoch evaluated the validation split; every epoch that began with alpha > 0 and no fossil
  has a counterfactual "solo:r1c1" result;
- the daemon's own event log (WatchEvents, in the JSON) holds SEED_GERMINATED, the four stage
  changes and SEED_FOSSILIZED.

Missing data (Debian's dataset-fashion-mnist, which deploy/install-deps.sh installs) is a failure,
not a skip.

usage: test_fashion_mnist.py KASMINAD SOURCE_DIR   (PYTHONPATH = build/client/python)
"""
import json
import os
import subprocess
import sys
import tempfile

KASMINAD, SRC = sys.argv[1], sys.argv[2]
EXAMPLE = os.path.join(SRC, "client", "python", "examples", "fashion_mnist.py")
FAILS = []


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL:", what, flush=True)
    return cond


def main():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        cmd = [sys.executable, EXAMPLE, "--spawn", KASMINAD, "--base-channels", "8",
               "--batch-size", "32", "--steps-per-epoch", "10", "--epochs", "26",
               "--germinate-after", "2", "--germinate-by", "3", "--lr", "0.02",
               "--seed-lr", "0.02", "--val-size", "500", "--test-limit", "500",
               "--no-progress", "--require-fossilized", "--json", out]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=600)
        print(p.stdout)
        if not check(p.returncode == 0, f"the example exited {p.returncode}"):
            return
        with open(out) as f:
            doc = json.load(f)

    ep = doc["epochs"]
    check(len(ep) == 26 and doc["final"]["steps"] == 260,
          f"{len(ep)} epochs, {doc['final']['steps']} steps")
    first, tail = ep[0]["train_loss"], sum(e["train_loss"] for e in ep[-3:]) / 3
    check(tail < 0.8 * first, f"train loss {first:.4f} -> {tail:.4f} (last three epochs)")
    check(ep[-1]["test_acc"] > ep[0]["test_acc"],
          f"test accuracy {ep[0]['test_acc']} -> {ep[-1]['test_acc']}")

    moves = [t for t in doc["transitions"] if t["slot"] == "r1c1"]
    check([t["to"] for t in moves] == ["GERMINATED", "TRAINING", "BLENDING", "HOLDING",
                                       "FOSSILIZED"], f"transitions {moves}")
    gates = {t["to"]: t["what"] for t in moves}
    check(gates.get("TRAINING", "").startswith("G1 passed"), f"G1: {gates.get('TRAINING')}")
    check(gates.get("BLENDING", "").startswith("G2 passed") and
          "seed_gradient_active_" in gates["BLENDING"] and "seed_ready" in gates["BLENDING"],
          f"strict G2 on collected gradients: {gates.get('BLENDING')}")
    check(gates.get("HOLDING", "").startswith("G3 passed"), f"G3: {gates.get('HOLDING')}")
    check(gates.get("FOSSILIZED", "").startswith("G5 passed") and
          "sufficient_contribution_" in gates["FOSSILIZED"], f"G5: {gates.get('FOSSILIZED')}")

    slot = [dict(e, **next(s for s in e["slots"] if s["slot"] == "r1c1")) for e in ep]
    blending = [s["alpha"] for s in slot if s["stage"] == "BLENDING"]
    check(all(s["alpha"] == 0 for s in slot if s["stage"] == "TRAINING"), "alpha in TRAINING")
    check(blending == sorted(blending) and max(blending, default=0) == 1.0,
          f"alpha during BLENDING {blending}")
    check(all(s["stage"] == "FOSSILIZED" for s in slot[-2:]), "r1c1 ends FOSSILIZED")
    check(all("main" in e["counterfactual"] for e in ep), "an epoch without validation")
    prev = 0.0
    for e, s in zip(ep, slot):
        if prev > 0 and "solo:r1c1" not in e["counterfactual"] and s["stage"] != "FOSSILIZED":
            check(False, f"epoch {e['epoch']}: no counterfactual for r1c1 at alpha {prev}")
        prev = s["alpha"] if s["stage"] != "FOSSILIZED" else 0.0
    check(any("contribution" in s for s in slot), "no contribution was measured")
    check(any("grad_ratio_ema" in s and s["stage"] == "TRAINING" for s in slot),
          "no folded gradient ratio during TRAINING")

    events = doc["final"]["events"]
    changes = [(e["type"], e["to_stage"]) for e in events if e["slot"] == "r1c1"]
    check(changes == [("SEED_GERMINATED", "GERMINATED"), ("SEED_STAGE_CHANGED", "TRAINING"),
                      ("SEED_STAGE_CHANGED", "BLENDING"), ("SEED_STAGE_CHANGED", "HOLDING"),
                      ("SEED_STAGE_CHANGED", "FOSSILIZED"), ("SEED_FOSSILIZED", "FOSSILIZED")],
          f"the daemon's events {changes}")


if __name__ == "__main__":
    main()
    if FAILS:
        print(f"{len(FAILS)} check(s) failed")
        sys.exit(1)
    print("fashion_mnist example: OK")
