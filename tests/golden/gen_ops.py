#!/usr/bin/python3
"""PyTorch golden fixtures for the op kernels (tests/unit/test_ops.c).

Regenerate (needs Debian's python3-torch; CI does not, it reads the committed files):

    cd <repo> && /usr/bin/python3 tests/golden/gen_ops.py

The output is deterministic (fixed seed, 2 threads); re-running it must leave git clean.

Files written next to this script, each a safetensors file written by hand here (u64 LE header
length, JSON header padded with spaces to a multiple of 8, then the data):

    ops_conv.safetensors   conv2d (k 1/3, pad 0/1, groups 1/2/depthwise, with/without bias)
    ops_norm.safetensors   batchnorm (eval), groupnorm (esper's group rule), layernorm, softmax
    ops_attn.safetensors   sdpa (causal / not, T 5..300, Tk up to 600, hd 8/16, fused-qkv views)
    ops_elem.safetensors   unary, binary (broadcast), lerp, copy/casts (F16, BF16, I32)
    ops_misc.safetensors   gemm, linear, embedding, mean, maxpool2, cross_entropy, argmax

Tensor names are "<case>.<role>" (e.g. "conv3x3_pad1_g2.x", ".w", ".b", ".y"). Every case is
described by one "__metadata__" entry: key = the case name, value = "op=<op> k=v ...", which
test_ops.c parses to know which op to run with which parameters. Metadata key "cases" lists the
case names of the file in order.

References are computed by PyTorch in float32 with its own modules (F.conv2d, F.group_norm, ...).
SDPA uses the math formula (softmax(q k^T * scale + mask) v) since torch 1.13 lacks
F.scaled_dot_product_attention; causal masks are bottom-right aligned (key j visible to query i
when j <= i + Tk - Tq), the op.h contract, which equals PyTorch's is_causal when Tq == Tk.
"""
import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))

torch.manual_seed(20241122)
torch.set_num_threads(2)

DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
      torch.int64: "I64", torch.int32: "I32"}


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    a = t.numpy()
    return a.astype(a.dtype.newbyteorder("<")).tobytes()


class Fixture:
    def __init__(self, name):
        self.name = name
        self.tensors = []  # (name, tensor)
        self.meta = {}
        self.cases = []

    def case(self, name, op, tensors, **params):
        assert name not in self.meta and "." not in name and " " not in name
        desc = ["op=" + op] + ["%s=%s" % (k, v) for k, v in params.items()]
        self.meta[name] = " ".join(desc)
        self.cases.append(name)
        for role, t in tensors.items():
            if t is None:
                continue
            self.tensors.append(("%s.%s" % (name, role), t))

    def write(self):
        header = {}
        blobs = []
        off = 0
        for name, t in self.tensors:
            b = raw(t)
            header[name] = {"dtype": DT[t.dtype], "shape": list(t.shape),
                            "data_offsets": [off, off + len(b)]}
            blobs.append(b)
            off += len(b)
        meta = dict(self.meta)
        meta["cases"] = ",".join(self.cases)
        header["__metadata__"] = meta
        hj = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        hj += b" " * ((8 - len(hj) % 8) % 8)
        path = os.path.join(HERE, self.name)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(hj)))
            f.write(hj)
            for b in blobs:
                f.write(b)
        print("%-24s %3d cases %7d bytes" % (self.name, len(self.cases), 8 + len(hj) + off))
        return 8 + len(hj) + off


def randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float32) * scale


# ---- conv2d ----

def conv_fixture():
    fx = Fixture("ops_conv.safetensors")
    # (name, N, Ci, H, W, Co, k, pad, groups, bias)
    cases = [
        ("conv1x1_pad0_g1", 2, 8, 6, 5, 12, 1, 0, 1, True),
        ("conv1x1_pad0_g2_nobias", 2, 8, 5, 5, 6, 1, 0, 2, False),
        ("conv1x1_pad1_g1", 1, 4, 5, 6, 3, 1, 1, 1, True),
        ("conv3x3_pad1_g1", 2, 6, 7, 9, 8, 3, 1, 1, True),
        ("conv3x3_pad1_g1_nobias", 2, 16, 16, 16, 32, 3, 1, 1, False),
        ("conv3x3_pad0_g1_nobias", 1, 4, 8, 7, 5, 3, 0, 1, False),
        ("conv3x3_pad1_g2", 2, 8, 6, 6, 8, 3, 1, 2, True),
        ("conv3x3_pad0_g2", 2, 4, 7, 5, 6, 3, 0, 2, True),
        ("conv3x3_pad1_dw", 2, 8, 7, 6, 8, 3, 1, 8, False),
        ("conv3x3_pad1_dw_bias", 2, 16, 5, 8, 16, 3, 1, 16, True),
        ("conv3x3_pad0_dw", 1, 4, 6, 6, 4, 3, 0, 4, True),
        ("conv3x3_pad1_g4_mult2", 1, 4, 5, 5, 8, 3, 1, 4, True),  # groups == Ci, Co = 2 Ci
        # Winograd on the CPU (>= 16 channels both sides): odd height and width (partial tiles)
        # with a bias, and 320 tiles over 5 images (two chunks of 256, one spanning images).
        ("conv3x3_pad1_wino_odd_bias", 3, 16, 7, 9, 24, 3, 1, 1, True),
        ("conv3x3_pad1_wino_chunks", 5, 16, 16, 16, 32, 3, 1, 1, True),
        # rows of more than 128 tiles (width 300) take the one-tile-at-a-time transforms
        ("conv3x3_pad1_wino_wide", 1, 16, 3, 300, 16, 3, 1, 1, True),
    ]
    for name, n, ci, h, w, co, k, pad, g, bias in cases:
        x = randn(n, ci, h, w)
        fan_in = ci // g * k * k
        wt = randn(co, ci // g, k, k, scale=1.0 / math.sqrt(fan_in))
        b = randn(co, scale=0.5) if bias else None
        y = F.conv2d(x, wt, b, stride=1, padding=pad, groups=g)
        fx.case(name, "conv2d", {"x": x, "w": wt, "b": b, "y": y}, pad=pad, groups=g)
    return fx


# ---- norms and softmax ----

def get_num_groups(c):
    """esper's GroupNorm group rule (K/blueprints/cnn.py)."""
    for n in (32, 16, 8, 4, 2, 1):
        if c % n == 0 and c // n >= 16:
            return n
    for n in (32, 16, 8, 4, 2, 1):
        if c % n == 0:
            return n
    return 1


def norm_fixture():
    fx = Fixture("ops_norm.safetensors")
    for name, shape, eps in [("bn_c8", (3, 8, 5, 5), 1e-5), ("bn_c16_eps1em3", (2, 16, 4, 3), 1e-3)]:
        c = shape[1]
        x = randn(*shape, scale=2.0) + 0.5
        mean = randn(c, scale=0.5)
        var = torch.rand(c) * 2.0 + 0.1
        w = randn(c, scale=0.5) + 1.0
        b = randn(c, scale=0.5)
        y = F.batch_norm(x, mean, var, w, b, training=False, eps=eps)
        fx.case(name, "batchnorm",
                {"x": x, "mean": mean, "var": var, "w": w, "b": b, "y": y}, eps=repr(eps))
    for c, shape, affine in [(32, (2, 32, 4, 4), True), (8, (2, 8, 5, 5), True),
                             (64, (1, 64, 3, 3), True), (16, (2, 16, 6, 6), False),
                             (12, (3, 12, 7), True)]:
        g = get_num_groups(c)
        x = randn(*shape, scale=3.0) + 1.0
        w = randn(c, scale=0.5) + 1.0 if affine else None
        b = randn(c, scale=0.5) if affine else None
        y = F.group_norm(x, g, w, b, eps=1e-5)
        name = "gn_c%d_g%d%s" % (c, g, "" if affine else "_noaffine")
        fx.case(name, "groupnorm", {"x": x, "w": w, "b": b, "y": y}, groups=g, eps="1e-05")
    for name, shape, affine in [("ln_d16", (2, 5, 16), True), ("ln_d24_noaffine", (3, 24), False),
                                ("ln_d384", (1, 3, 384), True)]:
        d = shape[-1]
        x = randn(*shape, scale=2.0) + 0.3
        w = randn(d, scale=0.5) + 1.0 if affine else None
        b = randn(d, scale=0.5) if affine else None
        y = F.layer_norm(x, (d,), w, b, eps=1e-5)
        fx.case(name, "layernorm", {"x": x, "w": w, "b": b, "y": y}, eps="1e-05")
    for name, shape, scale in [("softmax_rows", (4, 7, 10), 3.0), ("softmax_wide", (2, 129), 8.0),
                               ("softmax_1d", (5,), 1.0)]:
        x = randn(*shape, scale=scale)
        fx.case(name, "softmax", {"x": x, "y": torch.softmax(x, dim=-1)})
    return fx


# ---- attention ----

def sdpa_ref(q, k, v, causal, scale):
    tq, tk = q.shape[-2], k.shape[-2]
    att = (q @ k.transpose(-2, -1)) * scale
    if causal:
        i = torch.arange(tq).unsqueeze(1)
        j = torch.arange(tk).unsqueeze(0)
        att = att.masked_fill(j > i + (tk - tq), float("-inf"))
    return torch.softmax(att, dim=-1) @ v


def attn_fixture():
    fx = Fixture("ops_attn.safetensors")
    # (name, B, H, Tq, Tk, hd, causal, scale (0 = default 1/sqrt(hd)))
    for name, b, h, tq, tk, hd, causal, scale in [
        ("sdpa_causal_t5_hd8", 2, 3, 5, 5, 8, True, 0.0),
        ("sdpa_t9_hd8", 1, 2, 9, 9, 8, False, 0.0),
        ("sdpa_causal_t13_hd16", 2, 2, 13, 13, 16, True, 0.0),
        ("sdpa_t17_hd16", 1, 4, 17, 17, 16, False, 0.0),
        ("sdpa_t7_tk11_hd16_scale", 1, 2, 7, 11, 16, False, 0.3),
        ("sdpa_causal_t5_tk9_hd8", 2, 1, 5, 9, 8, True, 0.0),
    ]:
        q, k, v = randn(b, h, tq, hd), randn(b, h, tk, hd), randn(b, h, tk, hd)
        s = scale if scale > 0 else 1.0 / math.sqrt(hd)
        y = sdpa_ref(q, k, v, causal, s)
        fx.case(name, "sdpa", {"q": q, "k": k, "v": v, "y": y}, causal=int(causal),
                scale=repr(scale))
    # Fused: qkv [B, T, 3D] from c_attn; q/k/v are strided views [B,H,T,hd] of it, and the
    # output is written through a permuted view into y [B, T, H, hd] (merged heads).
    for name, b, t, nh, hd, causal in [("sdpa_fused_causal_t11_hd16", 2, 11, 3, 16, True),
                                       ("sdpa_fused_t6_hd8", 1, 6, 4, 8, False)]:
        d = nh * hd
        qkv = randn(b, t, 3 * d)
        q, k, v = qkv.split(d, dim=2)
        q = q.view(b, t, nh, hd).transpose(1, 2)
        k = k.view(b, t, nh, hd).transpose(1, 2)
        v = v.view(b, t, nh, hd).transpose(1, 2)
        y = sdpa_ref(q, k, v, causal, 1.0 / math.sqrt(hd)).transpose(1, 2).contiguous()
        fx.case(name, "sdpa_fused", {"qkv": qkv, "y": y}, causal=int(causal), heads=nh)
    # Longer sequences: more than one 64-key block of the CPU kernel's online softmax, with
    # sharp scores so the running maximum moves between blocks. Own generator, so the cases
    # above and the other fixtures keep their values.
    g = torch.Generator().manual_seed(150)
    for name, b, h, tq, tk, hd, causal, amp in [("sdpa_causal_t150_hd16", 1, 2, 150, 150, 16, True, 2.0),
                                               ("sdpa_t70_tk200_hd8", 1, 1, 70, 200, 8, False, 3.0)]:
        q = torch.randn(b, h, tq, hd, generator=g) * amp
        k = torch.randn(b, h, tk, hd, generator=g)
        v = torch.randn(b, h, tk, hd, generator=g)
        y = sdpa_ref(q, k, v, causal, 1.0 / math.sqrt(hd))
        fx.case(name, "sdpa", {"q": q, "k": k, "v": v, "y": y}, causal=int(causal), scale="0.0")
    # More keys than one 256-key chunk of the CPU kernel's blocked path (64-row query blocks,
    # online softmax across chunks, the causal diagonal accumulated row by row), including the
    # bottom-right causal offset (Tq < Tk) and fused-qkv views; a generator of their own.
    g = torch.Generator().manual_seed(151)
    for name, b, h, tq, tk, hd, causal, amp in [("sdpa_causal_t300_hd16", 1, 1, 300, 300, 16, True, 2.0),
                                               ("sdpa_causal_t100_tk520_hd8", 1, 1, 100, 520, 8, True, 3.0),
                                               ("sdpa_t40_tk600_hd8", 1, 1, 40, 600, 8, False, 3.0)]:
        q = torch.randn(b, h, tq, hd, generator=g) * amp
        k = torch.randn(b, h, tk, hd, generator=g)
        v = torch.randn(b, h, tk, hd, generator=g)
        y = sdpa_ref(q, k, v, causal, 1.0 / math.sqrt(hd))
        fx.case(name, "sdpa", {"q": q, "k": k, "v": v, "y": y}, causal=int(causal), scale="0.0")
    b, t, nh, hd = 1, 270, 2, 8
    d = nh * hd
    qkv = torch.randn(b, t, 3 * d, generator=g) * 1.5
    q, k, v = (x.view(b, t, nh, hd).transpose(1, 2) for x in qkv.split(d, dim=2))
    y = sdpa_ref(q, k, v, True, 1.0 / math.sqrt(hd)).transpose(1, 2).contiguous()
    fx.case("sdpa_fused_causal_t270_hd8", "sdpa_fused", {"qkv": qkv, "y": y}, causal=1, heads=nh)
    return fx


# ---- elementwise ----

def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (independent of torch)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where(nan, ((u >> 16) | 0x40) & 0xFFFF, r)
    return r.astype(np.uint16)


def elem_fixture():
    fx = Fixture("ops_elem.safetensors")
    x = randn(3, 5, 7, scale=3.0)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1.0, -1.0])
    fx.case("relu", "unary", {"x": x, "y": torch.relu(x)}, fn="relu")
    fx.case("gelu", "unary", {"x": x, "y": F.gelu(x, approximate="none")}, fn="gelu")
    fx.case("sigmoid", "unary", {"x": x, "y": torch.sigmoid(x)}, fn="sigmoid")
    fx.case("tanh", "unary", {"x": x, "y": torch.tanh(x)}, fn="tanh")
    xc = randn(4, 9, scale=0.8) + 0.5
    fx.case("clamp01", "unary", {"x": xc, "y": torch.clamp(xc, 0.0, 1.0)}, fn="clamp01")
    fx.case("affine", "unary", {"x": x, "y": x * 1.5 + (-0.25)}, fn="affine", a="1.5", b="-0.25")
    xb = randn(5, 1, 3)  # broadcast source for a unary op
    fx.case("gelu_bcast", "unary", {"x": xb, "y": F.gelu(xb.expand(2, 5, 4, 3))}, fn="gelu",
            out="2,5,4,3")

    a = randn(2, 3, 4, 5)
    for name, fn, b in [("add_same", "add", randn(2, 3, 4, 5)), ("add_bcast_c", "add", randn(3, 1, 5)),
                        ("sub_bcast_row", "sub", randn(5)), ("mul_per_sample", "mul", randn(2, 1, 1, 1)),
                        ("mul_scalar", "mul", randn(()))]:
        y = {"add": torch.add, "sub": torch.sub, "mul": torch.mul}[fn](a, b)
        fx.case(name, "binary", {"a": a, "b": b, "y": y}, fn=fn)
    # both sources broadcast: [4,1] op [1,5] -> [4,5]
    a2, b2 = randn(4, 1), randn(1, 5)
    fx.case("add_outer", "binary", {"a": a2, "b": b2, "y": a2 + b2}, fn="add")

    h, s = randn(2, 4, 3, 3), randn(2, 4, 3, 3)
    for name, w in [("lerp_scalar_0p3", torch.tensor(0.3)), ("lerp_scalar_0p8", torch.tensor(0.8)),
                    ("lerp_per_sample", torch.tensor([0.2, 0.7]).view(2, 1, 1, 1)),
                    ("lerp_outside", torch.tensor([-0.25, 1.5]).view(2, 1, 1, 1))]:
        fx.case(name, "lerp", {"a": h, "b": s, "w": w, "y": torch.lerp(h, s, w)})
    ht, st = randn(3, 5, 8), randn(3, 5, 8)
    wt = torch.tensor([0.0, 0.49, 1.0]).view(3, 1, 1)
    fx.case("lerp_per_row_t", "lerp", {"a": ht, "b": st, "w": wt, "y": torch.lerp(ht, st, wt)})

    # Casts. Values include zeros, infinities, NaN, F16 subnormals and overflow, ties.
    special = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.0,
               65520.0, 1e-5, 6e-8, 2.9e-8, 3.1e-8, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11,
               1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.0e38, -1.17549435e-38]
    xs = np.concatenate([np.array(special, dtype=np.float32),
                         (np.random.RandomState(7).randn(44) * 100).astype(np.float32)])
    with np.errstate(over="ignore"):
        f16 = xs.astype(np.float16)  # 65520 and 3e38 overflow to inf, as intended
    bf = bf16_bits(xs)
    tbf = torch.from_numpy(xs).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(xs)
    assert np.array_equal(bf[finite], tbf[finite]), "bf16 rounding disagrees with torch"
    xt = torch.from_numpy(xs)
    f16_t = torch.from_numpy(f16)
    bf_t = torch.from_numpy(bf.view(np.int16)).view(torch.bfloat16)
    fx.case("cast_f32_f16", "copy", {"x": xt, "y": f16_t})
    fx.case("cast_f16_f32", "copy", {"x": f16_t, "y": torch.from_numpy(f16.astype(np.float32))})
    fx.case("cast_f32_bf16", "copy", {"x": xt, "y": bf_t})
    fx.case("cast_bf16_f32", "copy", {"x": bf_t, "y": bf_t.to(torch.float32)})
    fx.case("cast_f16_bf16", "copy", {"x": f16_t, "y": f16_t.to(torch.float32).to(torch.bfloat16)})
    ids = torch.tensor([0, 1, -1, 2 ** 31 - 1, -2 ** 31, 123456789012, -5], dtype=torch.int64)
    fx.case("cast_i64_i32", "copy", {"x": ids, "y": ids.to(torch.int32)})
    fx.case("cast_i32_i64", "copy", {"x": ids.to(torch.int32), "y": ids.to(torch.int32).to(torch.int64)})
    return fx


# ---- gemm, linear, embedding, reductions, losses ----

def misc_fixture():
    fx = Fixture("ops_misc.safetensors")
    m, k, n = 5, 7, 6
    for name, ta, tb, alpha, beta in [("gemm_nn", 0, 0, 1.0, 0.0), ("gemm_tn", 1, 0, 0.5, 2.0),
                                      ("gemm_nt", 0, 1, 1.0, 1.0), ("gemm_tt", 1, 1, -1.5, 0.5)]:
        a = randn(k, m) if ta else randn(m, k)
        b = randn(n, k) if tb else randn(k, n)
        c = randn(m, n)
        y = alpha * ((a.t() if ta else a) @ (b.t() if tb else b)) + beta * c
        fx.case(name, "gemm", {"a": a, "b": b, "c": c, "y": y}, ta=ta, tb=tb, alpha=repr(alpha),
                beta=repr(beta))
    a, b, c = randn(3, 4, 6), randn(1, 6, 5), randn(3, 4, 5)
    fx.case("gemm_batched_bcast_b", "gemm", {"a": a, "b": b, "c": c, "y": a @ b},
            ta=0, tb=0, alpha="1.0", beta="0.0")
    a, b, c = randn(2, 6, 4), randn(2, 5, 6), randn(2, 4, 5)
    fx.case("gemm_batched_tt", "gemm",
            {"a": a, "b": b, "c": c, "y": 0.5 * (a.transpose(1, 2) @ b.transpose(1, 2)) + c},
            ta=1, tb=1, alpha="0.5", beta="1.0")

    x, w, bias = randn(2, 5, 12), randn(7, 12, scale=0.3), randn(7)
    fx.case("linear_bias", "linear", {"x": x, "w": w, "b": bias, "y": F.linear(x, w, bias)})
    x, w = randn(6, 12), randn(9, 12, scale=0.3)
    fx.case("linear_nobias", "linear", {"x": x, "w": w, "y": F.linear(x, w)})
    x, w, bias = randn(40, 96), randn(80, 96, scale=0.1), randn(80)
    fx.case("linear_wide", "linear", {"x": x, "w": w, "b": bias, "y": F.linear(x, w, bias)})

    wemb = randn(11, 6)
    idx = torch.randint(0, 11, (2, 5), dtype=torch.int64)
    fx.case("embedding_i64", "embedding", {"w": wemb, "idx": idx, "y": F.embedding(idx, wemb)})
    idx32 = torch.randint(0, 11, (7,), dtype=torch.int64)
    fx.case("embedding_i32", "embedding",
            {"w": wemb, "idx": idx32.to(torch.int32), "y": F.embedding(idx32, wemb)})

    x = randn(2, 6, 5, 4)
    fx.case("mean_hw", "mean", {"x": x, "y": x.mean(dim=(2, 3))}, begin=2, end=4)
    x = randn(3, 7, 10)
    fx.case("mean_t", "mean", {"x": x, "y": x.mean(dim=1)}, begin=1, end=2)
    x = randn(2, 300)
    fx.case("mean_all_but_first", "mean", {"x": x + 10.0, "y": (x + 10.0).mean(dim=1)}, begin=1,
            end=2)

    x = randn(2, 3, 7, 6)
    fx.case("maxpool_odd", "maxpool2", {"x": x, "y": F.max_pool2d(x, 2, 2)})
    x = randn(1, 2, 4, 4)
    x[0, 0, 0, 1] = float("nan")
    x[0, 1, 3, 3] = float("nan")
    fx.case("maxpool_nan", "maxpool2", {"x": x, "y": F.max_pool2d(x, 2, 2)})

    logits = randn(6, 10, scale=2.0)
    labels = torch.tensor([3, 0, 9, -100, 5, 3], dtype=torch.int64)
    y = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    fx.case("xent_ignore_m100", "cross_entropy", {"x": logits, "labels": labels, "y": y},
            ignore_index=-100)
    logits = randn(5, 4, scale=4.0)
    labels = torch.tensor([2, 1, 2, 0, 3], dtype=torch.int64)
    y = F.cross_entropy(logits, labels, reduction="none", ignore_index=2)
    fx.case("xent_ignore_2", "cross_entropy", {"x": logits, "labels": labels, "y": y},
            ignore_index=2)

    x = torch.randint(-3, 4, (6, 9)).to(torch.float32)  # many ties: the first max wins
    x[5, 4] = float("nan")
    x[5, 7] = float("nan")
    fx.case("argmax_ties_nan", "argmax", {"x": x, "y": torch.argmax(x, dim=1)})
    x = randn(4, 33)
    fx.case("argmax_rand", "argmax", {"x": x, "y": torch.argmax(x, dim=1)})
    return fx


def main():
    total = 0
    for fx in (conv_fixture(), norm_fixture(), attn_fixture(), elem_fixture(), misc_fixture()):
        total += fx.write()
    print("total %d bytes" % total)
    assert total < 2 * 1024 * 1024


if __name__ == "__main__":
    main()
