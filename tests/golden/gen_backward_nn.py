#!/usr/bin/python3
"""PyTorch golden fixtures for the norm, convolution and attention backward ops and train-mode
BatchNorm (tests/unit/test_ops_backward_nn.c).

Regenerate (needs Debian's python3-torch, /usr/bin/python3; CI reads the committed files):

    cd <repo> && /usr/bin/python3 tests/golden/gen_backward_nn.py

Deterministic (fixed seed, 2 threads); re-running it must leave git clean. Files (the format
and the "<case>.<role>" / "__metadata__" conventions of gen_ops.py, whose writer is reused):

    backward_nn_norm.safetensors  batchnorm_train (forward, running stats, saved statistics and
                                  backward), groupnorm_backward, layernorm_backward
    backward_nn_conv.safetensors  conv2d_backward: kernels 1..7 (non-square too), paddings 0..3,
                                  groups 1, 2, depthwise (multiplier 1 and 2), odd sizes
    backward_nn_attn.safetensors  sdpa_backward: causal (T 7, 13, 37, 65; Tq < Tk), non-causal,
                                  default and explicit scale
    backward_nn_dropout.safetensors  dropout (forward and backward: the same mask) and SDPA
                                  with attention-weight dropout, forward and backward; masks
                                  from philox.py (kasmina's generator, written from
                                  docs/training.md), p 0 .. 0.9, 64-bit seeds and steps

References are PyTorch autograd in float32 (F.batch_norm in training mode with momentum 0.1,
F.group_norm, F.layer_norm, F.conv2d; attention as the math formula softmax(q k^T * scale +
mask) v, mask bottom-right aligned as in gen_ops.py). Role names: inputs x, w, b, dy, q, k, v,
dout, rm, rv; results y, dx, dw, db, dq, dk, dv, rm_out, rv_out, mean, invstd.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_ops import Fixture, randn  # noqa: E402
import philox  # noqa: E402

torch.manual_seed(20250611)
torch.set_num_threads(2)


def grads(out, dy, *inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], dy)


# ---- norms ----

def norm_fixture():
    fx = Fixture("backward_nn_norm.safetensors")
    for name, shape in [("bn_n2c4_7x13", (2, 4, 7, 13)), ("bn_n1c3_13x7", (1, 3, 13, 7)),
                        ("bn_n5c6_3x3", (5, 6, 3, 3)), ("bn_n13c2_1x1", (13, 2, 1, 1))]:
        c = shape[1]
        x = randn(*shape, scale=2.0) + 0.5
        w = randn(c) * 0.5 + 1.0
        b = randn(c) * 0.2
        rm = randn(c) * 0.1
        rv = torch.rand(c) + 0.5
        dy = randn(*shape)
        y, mean, invstd = torch.native_batch_norm(x, w, b, rm.clone(), rv.clone(), True, 0.1,
                                                  1e-5)[:3]
        rm_out, rv_out = rm.clone(), rv.clone()
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        yg = F.batch_norm(xg, rm_out, rv_out, wg, bg, training=True, momentum=0.1, eps=1e-5)
        dx, dw, db = grads(yg, dy, xg, wg, bg)
        fx.case(name, "batchnorm_train",
                {"x": x, "w": w, "b": b, "rm": rm, "rv": rv, "dy": dy, "y": yg.detach(),
                 "rm_out": rm_out, "rv_out": rv_out, "mean": mean, "invstd": invstd, "dx": dx,
                 "dw": dw, "db": db}, eps="1e-5", momentum="0.1")
    for name, shape, groups, affine in [("gn_n2c6_7x13_g2", (2, 6, 7, 13), 2, True),
                                        ("gn_n3c8_5x7_g4", (3, 8, 5, 7), 4, True),
                                        ("gn_n2c6_7x7_g6", (2, 6, 7, 7), 6, True),
                                        ("gn_n2c4_13x1_g1_noaffine", (2, 4, 13, 1), 1, False)]:
        c = shape[1]
        x = randn(*shape, scale=1.5) - 0.3
        dy = randn(*shape)
        w = randn(c) * 0.5 + 1.0 if affine else None
        b = randn(c) * 0.2 if affine else None
        xg = x.clone().requires_grad_()
        wg = w.clone().requires_grad_() if affine else None
        bg = b.clone().requires_grad_() if affine else None
        y = F.group_norm(xg, groups, wg, bg, 1e-5)
        g = grads(y, dy, xg, wg, bg)
        t = {"x": x, "dy": dy, "w": w, "dx": g[0]}
        if affine:
            t.update({"dw": g[1], "db": g[2]})
        fx.case(name, "groupnorm_backward", t, groups=groups, eps="1e-5")
    for name, shape, affine in [("ln_3x13x24", (3, 13, 24), True), ("ln_7x13", (7, 13), True),
                                ("ln_2x5x48", (2, 5, 48), True), ("ln_4x7_noaffine", (4, 7), False)]:
        d = shape[-1]
        x = randn(*shape) * 1.3 + 0.2
        dy = randn(*shape)
        w = randn(d) * 0.5 + 1.0 if affine else None
        b = randn(d) * 0.2 if affine else None
        xg = x.clone().requires_grad_()
        wg = w.clone().requires_grad_() if affine else None
        bg = b.clone().requires_grad_() if affine else None
        y = F.layer_norm(xg, (d,), wg, bg, 1e-5)
        g = grads(y, dy, xg, wg, bg)
        t = {"x": x, "dy": dy, "w": w, "dx": g[0]}
        if affine:
            t.update({"dw": g[1], "db": g[2]})
        fx.case(name, "layernorm_backward", t, eps="1e-5")
    return fx


# ---- conv2d ----

def conv_fixture():
    fx = Fixture("backward_nn_conv.safetensors")
    # name, n, ci, h, w, co, kh, kw, ph, pw, groups, bias
    cases = [
        ("c1x1_p0", 2, 4, 7, 13, 6, 1, 1, 0, 0, 1, True),
        ("c1x1_p1", 1, 3, 7, 7, 5, 1, 1, 1, 1, 1, False),
        ("c3x3_p1", 2, 4, 7, 13, 6, 3, 3, 1, 1, 1, True),
        ("c3x3_p0_g2", 2, 4, 9, 7, 6, 3, 3, 0, 0, 2, True),
        ("c3x3_p1_wino", 1, 16, 7, 7, 16, 3, 3, 1, 1, 1, True),
        ("c5x5_p2_dw", 2, 6, 13, 7, 6, 5, 5, 2, 2, 6, True),
        ("c3x3_p1_dw_mult2", 2, 6, 7, 13, 12, 3, 3, 1, 1, 6, False),
        ("c3x5_p1x2", 2, 4, 7, 13, 5, 3, 5, 1, 2, 1, True),
        ("c7x7_p3", 1, 3, 13, 13, 4, 7, 7, 3, 3, 1, True),
        ("c2x2_p0_g2", 3, 4, 7, 7, 4, 2, 2, 0, 0, 2, True),
        ("c3x3_p3", 1, 2, 7, 7, 3, 3, 3, 3, 3, 1, True),
    ]
    for name, n, ci, h, wd, co, kh, kw, ph, pw, g, bias in cases:
        x = randn(n, ci, h, wd)
        w = randn(co, ci // g, kh, kw, scale=1.0 / (ci // g * kh * kw) ** 0.5)
        b = randn(co) * 0.1 if bias else None
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        bg = b.clone().requires_grad_() if bias else None
        y = F.conv2d(xg, wg, bg, padding=(ph, pw), groups=g)
        dy = randn(*y.shape)
        gr = grads(y, dy, xg, wg, bg)
        t = {"x": x, "w": w, "dy": dy, "dx": gr[0], "dw": gr[1]}
        if bias:
            t["db"] = gr[2]
        fx.case(name, "conv2d_backward", t, pad_h=ph, pad_w=pw, groups=g)
    return fx


# ---- attention ----

def sdpa(q, k, v, causal, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        i = torch.arange(tq).unsqueeze(1)
        j = torch.arange(tk).unsqueeze(0)
        s = s.masked_fill(j > i + (tk - tq), float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def attn_fixture():
    fx = Fixture("backward_nn_attn.safetensors")
    # name, b, h, tq, tk, hd, causal, scale (0 = 1/sqrt(hd))
    cases = [
        ("sdpa_causal_t7", 2, 3, 7, 7, 4, True, 0.0),
        ("sdpa_causal_t13", 1, 2, 13, 13, 8, True, 0.0),
        ("sdpa_causal_t37", 1, 2, 37, 37, 8, True, 0.0),
        ("sdpa_causal_t65", 1, 1, 65, 65, 16, True, 0.0),
        ("sdpa_causal_tq5_tk13", 1, 2, 5, 13, 8, True, 0.0),
        ("sdpa_full_t13", 2, 2, 13, 13, 8, False, 0.0),
        ("sdpa_causal_t13_scale", 1, 3, 13, 13, 8, True, 0.3),
    ]
    for name, b, h, tq, tk, hd, causal, scale in cases:
        q, k, v = randn(b, h, tq, hd), randn(b, h, tk, hd), randn(b, h, tk, hd)
        dout = randn(b, h, tq, hd)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        sc = scale if scale > 0 else 1.0 / hd ** 0.5
        out = sdpa(qg, kg, vg, causal, sc)
        dq, dk, dv = grads(out, dout, qg, kg, vg)
        fx.case(name, "sdpa_backward",
                {"q": q, "k": k, "v": v, "dout": dout, "dq": dq, "dk": dk, "dv": dv},
                causal=int(causal), scale=repr(float(scale)))
    return fx


# ---- dropout (kasmina's Philox masks, tests/golden/philox.py) ----

def masked(seed, step, site, shape, p):
    n = 1
    for d in shape:
        n *= d
    return torch.from_numpy(philox.factors(seed, step, site, n, p)).view(*shape)


def dropout_fixture():
    fx = Fixture("backward_nn_dropout.safetensors")
    # name, shape, p, seed, step, site
    cases = [
        ("drop_3x7x13_p01", (3, 7, 13), 0.1, 0x0123456789ABCDEF, 5, 0),
        ("drop_2x5x16_p05_step_hi", (2, 5, 16), 0.5, 7, (1 << 32) + 3, 3),
        ("drop_37_p09_site_max", (37,), 0.9, (1 << 63) + 11, 0, 65535),
        ("drop_5x3_p0", (5, 3), 0.0, 1, 1, 1),
    ]
    for name, shape, p, seed, step, site in cases:
        x, dy = randn(*shape), randn(*shape)
        xg = x.clone().requires_grad_()
        y = xg * masked(seed, step, site, shape, p)
        (dx,) = grads(y, dy, xg)
        fx.case(name, "dropout", {"x": x, "dy": dy, "y": y.detach(), "dx": dx}, p=repr(p),
                seed=seed, step=step, site=site)
    # torch's math SDPA with dropout_p: softmax(q k^T * scale + mask), dropout, @ v
    # name, b, h, tq, tk, hd, causal, p, seed, step, site
    cases = [
        ("sdpa_drop_causal_t7", 2, 3, 7, 7, 4, True, 0.2, 42, 0, 1),
        ("sdpa_drop_causal_t13_p05", 1, 2, 13, 13, 8, True, 0.5, 0xFEDCBA9876543210, 9, 4),
        ("sdpa_drop_full_t13", 1, 2, 13, 13, 8, False, 0.3, 3, 1 << 33, 7),
        ("sdpa_drop_causal_tq5_tk13", 1, 2, 5, 13, 8, True, 0.1, 5, 2, 10),
        ("sdpa_drop_causal_t67", 1, 1, 67, 67, 4, True, 0.1, 11, 4, 2),
    ]
    for name, b, h, tq, tk, hd, causal, p, seed, step, site in cases:
        q, k, v = randn(b, h, tq, hd), randn(b, h, tk, hd), randn(b, h, tk, hd)
        dout = randn(b, h, tq, hd)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        s = torch.matmul(qg, kg.transpose(-1, -2)) * (1.0 / hd ** 0.5)
        if causal:
            i = torch.arange(tq).unsqueeze(1)
            j = torch.arange(tk).unsqueeze(0)
            s = s.masked_fill(j > i + (tk - tq), float("-inf"))
        w = torch.softmax(s, dim=-1) * masked(seed, step, site, (b, h, tq, tk), p)
        out = torch.matmul(w, vg)
        dq, dk, dv = grads(out, dout, qg, kg, vg)
        fx.case(name, "sdpa_dropout",
                {"q": q, "k": k, "v": v, "dout": dout, "out": out.detach(), "dq": dq, "dk": dk,
                 "dv": dv}, causal=int(causal), p=repr(p), seed=seed, step=step, site=site)
    return fx


def main():
    total = 0
    for fx in (norm_fixture(), conv_fixture(), attn_fixture(), dropout_fixture()):
        total += fx.write()
    print("total %d bytes" % total)
    assert total < 360 * 1000


if __name__ == "__main__":
    main()
