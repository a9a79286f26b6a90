#!/usr/bin/python3
"""PyTorch golden fixtures for the blueprint modules and GatedBlend (tests/unit/test_blueprint.c).

Regenerate (needs Debian's python3-torch; CI does not, it reads the committed files):

    cd <repo> && /usr/bin/python3 tests/golden/gen_blueprints.py

The output is deterministic (fixed seed, 2 threads); re-running it must leave git clean.

Every module is built here from the specification (docs/blending.md#blend-operators, docs/models.md#cnn-blueprints, docs/models.md#transformer-blueprints; names
from docs/weights.md#slot-tensors), not from the C code, with every parameter randomised (also the
ones esper initialises to zero or 3.0, so that every term of the forward is exercised):

    blueprints_cnn.safetensors  the eight CNN blueprints at C=8 and C=16 (B=2, H=W=5) and the
                                CNN gate at C=8, 16 and 64
    blueprints_tf.safetensors   the eight transformer blueprints at D=48, T=7 (B=2); attention
                                and flex_attention also at T=130 (two 128-blocks); norm at T=130;
                                the transformer gate at D=48

Tensor names: "<case>.x" (input), "<case>.y" (reference output), "<case>.p.<name>" (each
parameter under its esper state_dict name relative to the seed / alpha_schedule). Metadata: one
entry per case, "kind=seed|gate topology=cnn|transformer blueprint=<name> channels=<C>", and
"cases" lists the case names in order (same writer as gen_ops.py).

References run in float32. Attention is the math formula with a causal mask (torch 1.13 has
neither F.scaled_dot_product_attention nor FlexAttention); flex_attention's reference is the same
causal attention, which is what its block mask computes.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen_ops import Fixture

torch.manual_seed(20250301)
torch.set_num_threads(2)


def get_num_groups(c):
    for n in (32, 16, 8, 4, 2, 1):
        if c % n == 0 and c // n >= 16:
            return n
    for n in (32, 16, 8, 4, 2, 1):
        if c % n == 0:
            return n
    return 1


# ---- CNN blueprints (docs/models.md#cnn-blueprints) ----

class CnnNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))
        self.norm = nn.GroupNorm(get_num_groups(c), c)

    def forward(self, x):
        return x + torch.tanh(self.scale) * (self.norm(x) - x)


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        r = max(1, c // 4)
        self.fc = nn.Sequential(nn.Linear(c, r, bias=False), nn.ReLU(), nn.Linear(r, c),
                                nn.Sigmoid())

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x * self.fc(s)[:, :, None, None]


class Depthwise(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pointwise = nn.Conv2d(c, c, 1, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(c), c)

    def forward(self, x):
        return x + F.relu(self.gn(self.pointwise(self.depthwise(x))))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        b = max(8, c // 4)
        self.down = nn.Conv2d(c, b, 1, bias=False)
        self.conv = nn.Conv2d(b, b, 3, padding=1, bias=False)
        self.up = nn.Conv2d(b, c, 1, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(c), c)

    def forward(self, x):
        return x + self.gn(self.up(F.relu(self.conv(F.relu(self.down(x))))))


class ConvSmall(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(c), c)

    def forward(self, x):
        return x + F.relu(self.gn(self.conv(x)))


class SeedConvBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(c), c)

    def forward(self, x):
        return F.relu(self.gn(self.conv(x)))


class ConvLight(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.enhance = SeedConvBlock(c)

    def forward(self, x):
        return x + self.enhance(x)


class ConvHeavy(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.enhance = nn.Sequential(SeedConvBlock(c), SeedConvBlock(c))

    def forward(self, x):
        return x + self.enhance(x)


class Noop(nn.Module):
    def __init__(self, c):
        super().__init__()

    def forward(self, x):
        return x


CNN = {"noop": Noop, "norm": CnnNorm, "attention": SE, "depthwise": Depthwise,
       "bottleneck": Bottleneck, "conv_small": ConvSmall, "conv_light": ConvLight,
       "conv_heavy": ConvHeavy}


# ---- Transformer blueprints (docs/models.md#transformer-blueprints) ----

class TfNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + torch.tanh(self.scale) * (self.norm(x) - x)


class Lora(nn.Module):
    def __init__(self, d, rank=8):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, d, bias=False)

    def forward(self, x):
        return x + self.up(self.down(x))


def causal_attention(q, k, v):
    t = q.shape[2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf"))
    return F.softmax(att, dim=-1) @ v


class Attention(nn.Module):
    def __init__(self, d, n_head=4):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.n_head
        qkv = self.qkv(x).view(b, t, 3, self.n_head, hd).permute(2, 0, 3, 1, 4)
        y = causal_attention(qkv[0], qkv[1], qkv[2])
        return x + self.proj(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, d, expansion):
        super().__init__()
        self.fc1 = nn.Linear(d, expansion * d)
        self.fc2 = nn.Linear(expansion * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


TF = {"noop": Noop, "norm": TfNorm, "lora": lambda d: Lora(d, 8),
      "lora_large": lambda d: Lora(d, 32), "attention": Attention, "flex_attention": Attention,
      "mlp_small": lambda d: Mlp(d, 2), "mlp": lambda d: Mlp(d, 4)}


# ---- GatedBlend (docs/blending.md#blend-operators) ----

class Gate(nn.Module):
    def __init__(self, c, topology):
        super().__init__()
        h = max(8, c // 4)
        self.topology = topology
        self.gate = nn.Sequential(nn.Linear(c, h), nn.ReLU(), nn.Linear(h, 1), nn.Sigmoid())

    def forward(self, x):
        if self.topology == "cnn":
            return self.gate(x.mean(dim=(2, 3))).view(-1, 1, 1, 1)
        return self.gate(x.mean(dim=1)).view(-1, 1, 1)


def randomise(m):
    """Every parameter random: U(+-1/sqrt(fan_in)) for weights and biases, norm affine near
    (1, 0), the norm blend scale in [-1.5, 1.5]."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "scale":
                p.uniform_(-1.5, 1.5)
            elif p.dim() == 1 and ("norm" in name or "gn" in name):
                if name.endswith("weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.uniform_(-0.5, 0.5)
            else:
                fan_in = p.shape[1] * (p[0][0].numel() if p.dim() > 2 else 1) if p.dim() > 1 \
                    else None
                if fan_in is None:  # a bias: the fan-in of its layer's weight
                    wname = name.rsplit(".", 1)[0] + ".weight"
                    w = dict(m.named_parameters())[wname]
                    fan_in = w.shape[1] * (w[0][0].numel() if w.dim() > 2 else 1)
                bound = 1.0 / math.sqrt(fan_in)
                p.uniform_(-bound, bound)


def add_case(fx, name, kind, topology, bp, c, m, x):
    randomise(m)
    with torch.no_grad():
        y = m(x)
    tensors = {"x": x, "y": y}
    for pname, p in m.state_dict().items():
        tensors["p." + pname] = p.detach().clone()
    fx.case(name, kind, tensors, topology=topology, blueprint=bp, channels=c)


def cnn_fixture():
    fx = Fixture("blueprints_cnn.safetensors")
    for c in (8, 16):
        for bp, ctor in CNN.items():
            x = torch.randn(2, c, 5, 5)
            add_case(fx, "cnn_%s_c%d" % (bp, c), "seed", "cnn", bp, c, ctor(c), x)
    for c in (8, 16, 64):
        x = torch.randn(3, c, 4, 3)
        add_case(fx, "cnn_gate_c%d" % c, "gate", "cnn", "gated", c, Gate(c, "cnn"), x)
    return fx


def tf_fixture():
    fx = Fixture("blueprints_tf.safetensors")
    d = 48
    for bp, ctor in TF.items():
        x = torch.randn(2, 7, d)
        add_case(fx, "tf_%s_d%d_t7" % (bp, d), "seed", "transformer", bp, d, ctor(d), x)
    for bp in ("norm", "attention", "flex_attention"):
        x = torch.randn(2, 130, d)
        add_case(fx, "tf_%s_d%d_t130" % (bp, d), "seed", "transformer", bp, d, TF[bp](d), x)
    x = torch.randn(3, 9, d)
    add_case(fx, "tf_gate_d%d" % d, "gate", "transformer", "gated", d, Gate(d, "transformer"), x)
    return fx


def main():
    total = 0
    for fx in (cnn_fixture(), tf_fixture()):
        total += fx.write()
    print("total %d bytes" % total)
    assert total < 1024 * 1024


if __name__ == "__main__":
    main()
