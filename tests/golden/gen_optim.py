#!/usr/bin/python3
"""PyTorch golden fixtures for the optimizer (tests/unit/test_optim.c).

Regenerate (needs Debian's python3-torch; CI does not, it reads the committed files):

    cd <repo> && /usr/bin/python3 tests/golden/gen_optim.py

Deterministic (fixed seed, 1 thread); re-running it must leave git clean. Files written next to
this script, in the format of gen_ops.py (Fixture, "<case>.<role>" tensors, one "__metadata__"
description "op=<op> k=v ..." per case, "cases" listing them):

    optim_sgd.safetensors    op=sgd: torch.optim.SGD over 3 parameters for 5 steps, momentum
                             0/0.9, dampening 0/0.5, nesterov, weight decay 0/5e-4. Roles: p<k>
                             (initial), s<t>.g<k> (gradient of step t; absent = None that step),
                             s<t>.p<k> / s<t>.b<k> (parameter / momentum buffer after step t;
                             no b while torch has no buffer).
    optim_clip.safetensors   op=clip: torch.nn.utils.clip_grad_norm_ over g<k> (absent = no
                             gradient): total (its float32 result), out<k> (scaled gradients).
    optim_stats.safetensors  op=stats: gradient statistics (docs/training.md) of host h<k> and
                             seed s<k> gradients (absent = none), computed here directly in
                             float64 from the spec's formulas; the expected values are in the
                             description (repr of the double). op=ema: the ratio EMA fold.
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_ops import Fixture  # noqa: E402  (same writer)

torch.manual_seed(20250301)
torch.set_num_threads(1)

SHAPES = [(4, 5), (7,), (2, 3, 3)]
# (step, param) pairs without a gradient: param 2 gets its first gradient at step 1 (its buffer
# is created then), param 1 has none on steps 1 and 3.
NO_GRAD = {(0, 2), (1, 1), (3, 1)}


def sgd_fixture():
    fx = Fixture("optim_sgd.safetensors")
    configs = [
        ("plain", 0.1, 0.0, 0.0, False, 0.0),
        ("plain_wd", 0.1, 0.0, 0.0, False, 5e-4),
        ("mom", 0.01, 0.9, 0.0, False, 0.0),
        ("mom_wd", 0.01, 0.9, 0.0, False, 5e-4),
        ("mom_damp", 0.05, 0.9, 0.5, False, 0.0),
        ("mom_damp_wd", 0.05, 0.9, 0.5, False, 5e-4),
        ("nesterov", 0.01, 0.9, 0.0, True, 0.0),
        ("nesterov_wd", 0.01, 0.9, 0.0, True, 5e-4),
        ("wd_big", 0.3, 0.5, 0.0, False, 0.1),
    ]
    for name, lr, mom, damp, nest, wd in configs:
        params = [torch.randn(*s) for s in SHAPES]
        tensors = {"p%d" % k: p.clone() for k, p in enumerate(params)}
        params = [torch.nn.Parameter(p) for p in params]
        opt = torch.optim.SGD(params, lr=lr, momentum=mom, dampening=damp, nesterov=nest,
                              weight_decay=wd)
        for t in range(5):
            for k, p in enumerate(params):
                if (t, k) in NO_GRAD:
                    p.grad = None
                else:
                    g = torch.randn(*SHAPES[k]) * (0.5 + t)
                    p.grad = g
                    tensors["s%d.g%d" % (t, k)] = g.clone()
            opt.step()
            for k, p in enumerate(params):
                tensors["s%d.p%d" % (t, k)] = p.detach().clone()
                st = opt.state[p]
                if "momentum_buffer" in st and st["momentum_buffer"] is not None:
                    tensors["s%d.b%d" % (t, k)] = st["momentum_buffer"].clone()
        fx.case("sgd_" + name, "sgd", tensors, lr=repr(lr), momentum=repr(mom),
                dampening=repr(damp), nesterov=int(nest), weight_decay=repr(wd), steps=5,
                params=len(SHAPES))
    return fx


def clip_fixture():
    fx = Fixture("optim_clip.safetensors")

    def case(name, grads, max_norm):
        params = []
        tensors = {}
        for k, g in enumerate(grads):
            p = torch.nn.Parameter(torch.zeros(g.shape if g is not None else (3,)))
            if g is not None:
                p.grad = g.clone()
                tensors["g%d" % k] = g.clone()
            params.append(p)
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        tensors["total"] = total.reshape(1).float()
        for k, p in enumerate(params):
            if p.grad is not None:
                tensors["out%d" % k] = p.grad.clone()
        fx.case(name, "clip", tensors, max_norm=repr(max_norm), n=len(grads))

    gs = [torch.randn(4, 5), None, torch.randn(9), torch.randn(2, 3, 3)]
    case("clip_below", gs, 1.0)       # total ~ 6: scaled
    case("clip_above", gs, 100.0)     # coef 1, still multiplied
    case("clip_tiny", [torch.randn(6) * 1e-4, torch.randn(3) * 1e-4], 1.0)
    big = torch.randn(30) * 50
    case("clip_big", [big, torch.randn(4)], 0.5)
    inf = torch.randn(5)
    inf[2] = float("inf")
    case("clip_inf", [inf, torch.randn(4)], 1.0)  # total inf: coef 0, inf * 0 = NaN
    return fx


def sumsq(g):
    return float(np.sum(g.numpy().astype(np.float64) ** 2))


def stats_ref(host, seed, vth=1e-7, eth=10.0):
    hs = [sumsq(g) for g in host if g is not None]
    ss = [sumsq(g) for g in seed if g is not None]
    host_norm = math.sqrt(sum(hs)) if hs else 0.0
    host_count = sum(g.numel() for g in host if g is not None)
    norm = math.sqrt(sum(ss)) if ss else 0.0
    count = sum(g.numel() for g in seed if g is not None)
    if norm < 1e-8 or host_norm < 1e-8 or count == 0 or host_count == 0:
        ratio = 0.0
    else:
        ratio = (norm / math.sqrt(count)) / (host_norm / math.sqrt(host_count) + 1e-8)
    if not ss:
        health, van, exp = 1.0, 0, 0
    else:
        ns = [math.sqrt(s) for s in ss]
        van = sum(1 for n in ns if n < vth)
        exp = sum(1 for n in ns if n > eth or not math.isfinite(n))
        health = 1.0 - 0.5 * van / len(ns) - 0.8 * exp / len(ns)
        health = min(max(health, 0.0), 1.0)
        if not math.isfinite(norm):
            health = 0.0
    return dict(host_norm=repr(host_norm), host_count=host_count, grad_norm=repr(norm),
                param_count=count, ratio=repr(ratio), health=repr(health), vanishing=int(van > 0),
                exploding=int(exp > 0), vth=repr(vth), eth=repr(eth))


def stats_fixture():
    fx = Fixture("optim_stats.safetensors")

    def case(name, host, seed, **kw):
        tensors = {}
        for k, g in enumerate(host):
            if g is not None:
                tensors["h%d" % k] = g
        for k, g in enumerate(seed):
            if g is not None:
                tensors["s%d" % k] = g
        fx.case(name, "stats", tensors, nh=len(host), ns=len(seed), **stats_ref(host, seed, **kw))

    host = [torch.randn(16, 8) * 0.1, torch.randn(16) * 0.01, None, torch.randn(4, 16) * 0.05]
    case("stats_normal", host, [torch.randn(8, 4) * 0.2, torch.randn(8) * 0.02])
    case("stats_none_missing", host, [None, torch.randn(8, 4) * 0.2, None])
    case("stats_vanishing", host, [torch.randn(8, 4) * 1e-9, torch.randn(8) * 0.1,
                                    torch.randn(3) * 1e-10])
    case("stats_exploding", host, [torch.randn(8, 4) * 30, torch.randn(8) * 0.1])
    case("stats_mixed", host, [torch.randn(8, 4) * 30, torch.randn(8) * 1e-9,
                               torch.randn(5) * 0.5, torch.randn(2) * 100])
    inf = torch.randn(6)
    inf[1] = float("inf")
    case("stats_inf", host, [inf, torch.randn(8) * 0.1])
    nan = torch.randn(6)
    nan[4] = float("nan")
    case("stats_nan", host, [nan, torch.randn(8) * 1e-9])
    case("stats_no_seed_grad", host, [None, None])
    case("stats_empty_seed", host, [])
    case("stats_host_zero", [torch.zeros(5), None], [torch.randn(4)])
    case("stats_host_none", [None], [torch.randn(4)])
    case("stats_thresholds", host, [torch.randn(8, 4) * 0.2, torch.randn(8) * 0.02],
         vth=0.05, eth=0.5)

    # the EMA fold: first value as is, then beta * ema + (1 - beta) * r
    for name, beta, rs in [("ema_default", 0.9, [1.7, 0.4, 2.2, 0.0, 0.9]),
                           ("ema_half", 0.5, [0.3, 1.1, 5.0])]:
        emas, ema = [], None
        for r in rs:
            ema = r if ema is None else beta * ema + (1.0 - beta) * r
            emas.append(ema)
        fx.case(name, "ema", {}, beta=repr(beta), r=",".join(repr(x) for x in rs),
                ema=",".join(repr(x) for x in emas))
    return fx


def main():
    total = 0
    for fx in (sgd_fixture(), clip_fixture(), stats_fixture()):
        total += fx.write()
    print("total %d bytes" % total)
    assert total < 512 * 1024


if __name__ == "__main__":
    main()
