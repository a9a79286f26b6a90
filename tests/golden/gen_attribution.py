#!/usr/bin/env python3
"""Attribution goldens: esper-lite's own CounterfactualEngine (simic/attribution/counterfactual.py)
and CPython's random.Random, the references of Evaluate's attribution (docs/evaluate.md#attribution).

Regenerate (needs esper-lite's source, read-only, at ESPER_SRC; CI reads the committed file):

    ESPER_SRC=/work/esper-lite/src /usr/bin/python3 tests/golden/gen_attribution.py

Output tests/golden/attribution.json:
  rng: per seed, random.Random(seed).getrandbits(32) x 3, then from a second Random(seed) the
       shuffles of list(range(n)) for n = 1..12, 64 in turn (one generator).
  permutation: per case (n, samples, seed), esper's engine with strategy "shapley" built fresh
       with seed: generate_configs (coalitions as hex masks, bit j = seed j on, duplicates dropped
       in first-seen order), the synthetic value of each, then compute_shapley_values on exactly
       those results (mean, std, n_samples per seed) and the marginal v(all) - v(all without j).
  exact: per n, the value of every coalition 0..2^n-1, the Shapley values as the mean over all n!
       orderings (itertools.permutations, not the subset-weight formula the daemon uses), the
       marginals, and every pair's interaction (esper's compute_interaction_terms for n <= 3, the
       formula v({a,b}) - v({a}) - v({b}) + v({}) above).
Values are accuracies in percent, 100 * c / 64 for c in 0..64 from a hash of the mask and n.
"""
import itertools
import json
import math
import os
import sys

ESPER_SRC = os.environ.get("ESPER_SRC", "/work/esper-lite/src")
sys.path.insert(0, ESPER_SRC)
from esper.simic.attribution.counterfactual import (  # noqa: E402
    CounterfactualConfig,
    CounterfactualEngine,
)
import random  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "attribution.json")


def mask_of(cfg):
    return sum(1 << j for j, on in enumerate(cfg) if on)


def value(n, mask):
    h = (mask * 0x9E3779B97F4A7C15 + n) & (2**64 - 1)
    h ^= h >> 29
    h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    h ^= h >> 32
    return 100.0 * (h % 65) / 64.0


def rng_cases():
    out = []
    for seed in [0, 1, 42, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1]:
        r = random.Random(seed)
        raw = [r.getrandbits(32) for _ in range(3)]
        r = random.Random(seed)
        perms = []
        for n in list(range(1, 13)) + [64]:
            p = list(range(n))
            r.shuffle(p)
            perms.append(p)
        out.append({"seed": str(seed), "u32": raw, "perms": perms})
    return out


def permutation_case(n, samples, seed):
    eng = CounterfactualEngine(CounterfactualConfig(strategy="shapley", shapley_samples=samples,
                                                    seed=seed))
    slot_ids = [f"s{j}" for j in range(n)]
    configs = eng.generate_configs(slot_ids)
    masks, seen = [], set()
    for cfg in configs:
        m = mask_of(cfg)
        if m not in seen:
            seen.add(m)
            masks.append(m)
    results = {cfg: (0.0, value(n, mask_of(cfg))) for cfg in configs}
    matrix = eng.compute_matrix_from_results(slot_ids, results, compute_time_seconds=0.0)
    est = eng.compute_shapley_values(matrix)
    allm = (1 << n) - 1
    return {
        "n": n, "samples": samples, "seed": str(seed),
        "coalitions": [format(m, "x") for m in masks],
        "values": [value(n, m) for m in masks],
        "mean": [est[s].mean for s in slot_ids],
        "std": [est[s].std for s in slot_ids],
        "n_samples": [est[s].n_samples for s in slot_ids],
        "marginal": [value(n, allm) - value(n, allm & ~(1 << j)) for j in range(n)],
    }


def exact_case(n):
    v = [value(n, m) for m in range(1 << n)]
    phi = [0.0] * n
    count = 0
    for order in itertools.permutations(range(n)):
        s = 0
        for j in order:
            phi[j] += v[s | (1 << j)] - v[s]
            s |= 1 << j
        count += 1
    phi = [p / count for p in phi]
    allm = (1 << n) - 1
    inter = []
    if n <= 3:
        eng = CounterfactualEngine(CounterfactualConfig(strategy="full_factorial", seed=0))
        slot_ids = [f"s{j}" for j in range(n)]
        results = {tuple(bool(m >> j & 1) for j in range(n)): (0.0, v[m]) for m in range(1 << n)}
        matrix = eng.compute_matrix_from_results(slot_ids, results, compute_time_seconds=0.0)
        terms = eng.compute_interaction_terms(matrix)
        for a in range(n):
            for b in range(a + 1, n):
                inter.append(terms[(slot_ids[a], slot_ids[b])].interaction)
    else:
        for a in range(n):
            for b in range(a + 1, n):
                inter.append(v[(1 << a) | (1 << b)] - v[1 << a] - v[1 << b] + v[0])
    return {
        "n": n, "values": v, "shapley": phi, "n_samples": math.factorial(n),
        "marginal": [v[allm] - v[allm & ~(1 << j)] for j in range(n)],
        "interactions": inter,
    }


def main():
    perm = [permutation_case(*c) for c in [
        (1, 20, 0), (2, 20, 7), (3, 20, 42), (4, 2, 5), (4, 1, 3), (5, 7, 2**40 + 3),
        (9, 20, 123), (12, 150, 99), (20, 20, 2**64 - 1), (64, 4, 11)]]
    exact = [exact_case(n) for n in (1, 2, 3, 5, 8)]
    with open(OUT, "w") as f:
        json.dump({"rng": rng_cases(), "permutation": perm, "exact": exact}, f, indent=0)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
