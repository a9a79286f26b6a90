#!/usr/bin/python3
"""PyTorch reference fixtures for whole Kasmina models: hosts, seeds, blends, fused forwards.
(Over 900 lines on purpose: one self-contained generator, so that the fixtures can be rebuilt
from this file and PyTorch alone.)

Regenerate (needs Debian's python3-torch; CI does not, it reads the committed files):

    cd <repo> && /usr/bin/python3 tests/golden/gen_kasmina.py

Deterministic (fixed seed, 1 thread, CPU, float32); re-running it must leave git clean.

This is an independent re-implementation of esper-lite's MorphogeneticModel (CNNHost /
TransformerHost, the 8+8 blueprints, GatedBlend and SeedSlot.forward) written from
the project spec (kasmina-behaviour.md s2.5, s3, s4, s5, s6.1 and esper-state-dict.md); it does not
look at the C engine. Every nn.Module below has esper's exact state_dict names.

Output directory tests/golden/kasmina/, per case <name>:

    <name>.weights.safetensors   what LoadWeights receives: every tensor by esper state_dict
                                 name, plus __metadata__ "seed_slots.<id>._extra_state" (JSON,
                                 schema v1) for every registered slot
    <name>.io.safetensors        input / expected (and fused.* for fused cases), plus
                                 __metadata__ "spec" (host config JSON), "description" and,
                                 for fused cases, "fused" (K, B and the per-config alphas)

See tests/golden/kasmina/README.md for the case list.
"""
import json
import math
import os
import struct
from datetime import datetime, timedelta, timezone

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OUTDIR = os.path.join(HERE, "kasmina")

torch.manual_seed(20260621)
torch.set_num_threads(1)

DT = {torch.float32: "F32", torch.int64: "I64"}

# ---------------------------------------------------------------------------------------------
# enums (kasmina-behaviour.md s1.1, s2.1)
# ---------------------------------------------------------------------------------------------
DORMANT, GERMINATED, TRAINING, BLENDING, HOLDING, FOSSILIZED = 1, 2, 3, 4, 6, 7
PRUNED, EMBARGOED, RESETTING = 8, 9, 10
ACTIVE = {TRAINING, BLENDING, HOLDING, FOSSILIZED}
SEED_MODULE_STAGES = {GERMINATED, TRAINING, BLENDING, HOLDING, FOSSILIZED}
HOLD, UP, DOWN = 0, 1, 2
LINEAR, COSINE, SIGMOID = 1, 2, 3
CURVE_NAME = {LINEAR: "LINEAR", COSINE: "COSINE", SIGMOID: "SIGMOID"}
ADD, MULTIPLY, GATE = 1, 2, 3
ALG_NAME = {ADD: "ADD", MULTIPLY: "MULTIPLY", GATE: "GATE"}
STAGE_NAME = {GERMINATED: "GERMINATED", TRAINING: "TRAINING", BLENDING: "BLENDING",
              HOLDING: "HOLDING", FOSSILIZED: "FOSSILIZED", PRUNED: "PRUNED",
              EMBARGOED: "EMBARGOED", RESETTING: "RESETTING"}


# ---------------------------------------------------------------------------------------------
# safetensors writer (same conventions as gen_ops.py)
# ---------------------------------------------------------------------------------------------
def raw(t: torch.Tensor) -> bytes:
    a = t.detach().contiguous().numpy()
    return a.astype(a.dtype.newbyteorder("<")).tobytes()


def write_safetensors(path, tensors, meta):
    """tensors: list of (name, tensor); meta: dict str -> str."""
    header = {}
    blobs = []
    off = 0
    for name, t in tensors:
        assert name not in header, name
        b = raw(t)
        header[name] = {"dtype": DT[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    for k, v in meta.items():
        assert isinstance(k, str) and isinstance(v, str)
    header["__metadata__"] = meta
    hj = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    return 8 + len(hj) + off


# ---------------------------------------------------------------------------------------------
# shared math
# ---------------------------------------------------------------------------------------------
def get_num_groups(c):
    """esper's GroupNorm group rule (kasmina-behaviour.md s4.1)."""
    for n in (32, 16, 8, 4, 2, 1):
        if c % n == 0 and c // n >= 16:
            return n
    for n in (32, 16, 8, 4, 2, 1):
        if c % n == 0:
            return n
    return 1


def causal_sdpa(q, k, v):
    """softmax(q k^T / sqrt(hd) + causal mask) v; q,k,v [B,H,T,hd] (torch 1.13 has no F.sdpa)."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---------------------------------------------------------------------------------------------
# hosts (s5.2, s5.3)
# ---------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)  # eps 1e-5, momentum 0.1

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CNNHost(nn.Module):
    topology = "cnn"

    def __init__(self, num_classes=10, n_blocks=3, base_channels=32, pool_layers=None,
                 kernel_size=3, in_channels=3):
        super().__init__()
        assert n_blocks >= 2
        self.n_blocks = n_blocks
        self.pool_layers = n_blocks if pool_layers is None else pool_layers
        chans = [base_channels * 2 ** i for i in range(n_blocks)]
        self.blocks = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.blocks.append(ConvBlock(cin, c, kernel_size))
            cin = c
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(chans[-1], num_classes)
        # timeline of ops and the segment boundary after each op
        self.ops = []
        self.boundary = {}  # slot id -> index of the op it follows
        self.segment_channels = {}
        for i in range(n_blocks):
            self.ops.append(("block", i))
            self.boundary["r0c%d" % i] = len(self.ops) - 1
            self.segment_channels["r0c%d" % i] = chans[i]
            if i < self.pool_layers:
                self.ops.append(("pool", i))
                self.boundary["r1c%d" % i] = len(self.ops) - 1
                self.segment_channels["r1c%d" % i] = chans[i]

    def execution_order(self):
        return sorted(self.boundary, key=lambda s: self.boundary[s])

    def _run(self, op, x):
        kind, i = op
        return self.blocks[i](x) if kind == "block" else self.pool(x)

    def forward_to_segment(self, to, x, frm=None):
        start = -1 if frm is None else self.boundary[frm]
        end = self.boundary[to]
        if end <= start:
            raise ValueError("backwards routing")
        for op in self.ops[start + 1:end + 1]:
            x = self._run(op, x)
        return x

    def forward_from_segment(self, seg, x):
        for op in self.ops[self.boundary[seg] + 1:]:
            x = self._run(op, x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)

    def forward(self, x):
        for op in self.ops:
            x = self._run(op, x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.d, self.n_head = d, n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        hd = c // self.n_head
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)
        k = k.view(b, t, self.n_head, hd).transpose(1, 2)
        v = v.view(b, t, self.n_head, hd).transpose(1, 2)
        y = causal_sdpa(q, k, v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class TransformerBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerHost(nn.Module):
    topology = "transformer"

    def __init__(self, vocab_size, n_embd, n_head, n_layer, block_size, num_segments):
        super().__init__()
        assert n_layer % num_segments == 0
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.layers = nn.ModuleList([TransformerBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        per = n_layer // num_segments
        self.seg_end = {"r0c%d" % i: (i + 1) * per for i in range(num_segments)}
        self.segment_channels = {s: n_embd for s in self.seg_end}

    def execution_order(self):
        return sorted(self.seg_end, key=lambda s: self.seg_end[s])

    def embed(self, idx):
        t = idx.shape[1]
        assert t <= self.block_size
        return self.tok_emb(idx) + self.pos_emb(torch.arange(t))

    def forward_to_segment(self, to, x, frm=None):
        if frm is None:
            x, start = self.embed(x), 0
        else:
            start = self.seg_end[frm]
        end = self.seg_end[to]
        if end <= start and frm is not None:
            raise ValueError("backwards routing")
        for layer in self.layers[start:end]:
            x = layer(x)
        return x

    def forward_from_segment(self, seg, x):
        for layer in self.layers[self.seg_end[seg]:]:
            x = layer(x)
        return self.head(self.ln_f(x))

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------
# CNN blueprints (s4.2), input [B,C,H,W]
# ---------------------------------------------------------------------------------------------
class CnnNoop(nn.Module):
    def __init__(self, c=None):
        super().__init__()

    def forward(self, x):
        return x


class CnnNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(get_num_groups(c), c)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + torch.tanh(self.scale) * (self.norm(x) - x)


class CnnAttention(nn.Module):  # SE block
    def __init__(self, c):
        super().__init__()
        r = max(1, c // 4)
        self.fc = nn.Sequential(nn.Linear(c, r, bias=False), nn.ReLU(), nn.Linear(r, c),
                                nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        y = self.fc(x.mean(dim=(2, 3))).reshape(b, c, 1, 1)
        return x * y


class CnnDepthwise(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pointwise = nn.Conv2d(c, c, 1, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(c), c)

    def forward(self, x):
        return x + F.relu(self.gn(self.pointwise(self.depthwise(x))))


class CnnBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        b = max(8, c // 4)
        self.down = nn.Conv2d(c, b, 1, bias=False)
        self.conv = nn.Conv2d(b, b, 3, padding=1, bias=False)
        self.up = nn.Conv2d(b, c, 1, bias=False)
        self.gn = nn.GroupNorm(get_num_groups(c), c)

    def forward(self, x):
        return x + self.gn(self.up(F.relu(self.conv(F.relu(self.down(x))))))


class CnnConvSmall(nn.Module):
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


class CnnConvLight(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.enhance = SeedConvBlock(c)

    def forward(self, x):
        return x + self.enhance(x)


class CnnConvHeavy(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.enhance = nn.Sequential(SeedConvBlock(c), SeedConvBlock(c))

    def forward(self, x):
        return x + self.enhance(x)


CNN_BLUEPRINTS = {"noop": CnnNoop, "norm": CnnNorm, "attention": CnnAttention,
                  "depthwise": CnnDepthwise, "bottleneck": CnnBottleneck,
                  "conv_small": CnnConvSmall, "conv_light": CnnConvLight,
                  "conv_heavy": CnnConvHeavy}
CNN_PARAMS = {"noop": lambda c: 0, "norm": lambda c: 2 * c + 1,
              "attention": lambda c: 2 * c * max(1, c // 4) + c,
              "depthwise": lambda c: c * c + 11 * c,
              "bottleneck": lambda c: 2 * c * max(8, c // 4) + 9 * max(8, c // 4) ** 2 + 2 * c,
              "conv_small": lambda c: c * c + 2 * c, "conv_light": lambda c: 9 * c * c + 2 * c,
              "conv_heavy": lambda c: 18 * c * c + 4 * c}


# ---------------------------------------------------------------------------------------------
# transformer blueprints (s4.3), input [B,T,D]
# ---------------------------------------------------------------------------------------------
class TfNoop(nn.Module):  # nn.Identity
    def __init__(self, d=None):
        super().__init__()

    def forward(self, x):
        return x


class TfNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + torch.tanh(self.scale) * (self.norm(x) - x)


class TfLora(nn.Module):
    def __init__(self, d, rank=8):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, d, bias=False)

    def forward(self, x):
        return x + self.up(self.down(x))


class TfAttention(nn.Module):  # also flex_attention: same math (causal), same keys
    def __init__(self, d, n_head=4):
        super().__init__()
        assert d % n_head == 0
        self.n_head, self.hd = n_head, d // n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.n_head, self.hd).permute(2, 0, 3, 1, 4)
        out = causal_sdpa(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, c)
        return x + self.proj(out)


class TfMlp(nn.Module):
    def __init__(self, d, expansion):
        super().__init__()
        self.fc1 = nn.Linear(d, d * expansion)
        self.fc2 = nn.Linear(d * expansion, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


TF_BLUEPRINTS = {"noop": TfNoop, "norm": TfNorm, "lora": lambda d: TfLora(d, 8),
                 "lora_large": lambda d: TfLora(d, 32), "attention": TfAttention,
                 "mlp_small": lambda d: TfMlp(d, 2), "mlp": lambda d: TfMlp(d, 4),
                 "flex_attention": TfAttention}
TF_PARAMS = {"noop": lambda d: 0, "norm": lambda d: 2 * d + 1, "lora": lambda d: 16 * d,
             "lora_large": lambda d: 64 * d, "attention": lambda d: 4 * d * d + 4 * d,
             "flex_attention": lambda d: 4 * d * d + 4 * d,
             "mlp_small": lambda d: 4 * d * d + 3 * d, "mlp": lambda d: 8 * d * d + 5 * d}


# ---------------------------------------------------------------------------------------------
# GatedBlend (s3) and the slot forward (s2.5)
# ---------------------------------------------------------------------------------------------
class GatedBlend(nn.Module):
    algorithm_id = "gated"

    def __init__(self, channels, topology, total_steps):
        super().__init__()
        h = max(8, channels // 4)
        self.topology, self.total_steps = topology, total_steps
        self.gate = nn.Sequential(nn.Linear(channels, h), nn.ReLU(), nn.Linear(h, 1),
                                  nn.Sigmoid())

    def get_alpha_for_blend(self, x):
        if self.topology == "cnn":
            return self.gate(x.mean(dim=[2, 3])).view(-1, 1, 1, 1)
        return self.gate(x.mean(dim=1)).view(-1, 1, 1)


def clamp01(t):
    return torch.clamp(t, 0.0, 1.0)


class SeedSlot(nn.Module):
    """Tensors: seed.* and alpha_schedule.*; everything else is plain Python (extra state)."""

    def __init__(self, slot_id, channels):
        super().__init__()
        self.slot_id, self.channels = slot_id, channels
        self.seed = None
        self.alpha_schedule = None
        self.extra = None  # the _extra_state dict
        self.disabled = False  # test hook: treat as inactive (sensitivity checks)

    @property
    def state(self):
        return None if self.extra is None else self.extra["seed_state"]

    def forward(self, h, alpha_override=None):
        st = self.state
        if self.disabled or self.seed is None or st is None or st["stage"] not in ACTIVE:
            return h  # seed not evaluated; override ignored
        seed_input = h  # isolate_gradients only detaches: same values
        s = self.seed(seed_input)
        if alpha_override is None and st["stage"] == TRAINING and st["alpha"] == 0.0:
            return h + (s - s.detach())  # STE: value == h
        a = alpha_override if alpha_override is not None else \
            torch.tensor(st["alpha"], dtype=h.dtype, device=h.device)
        alg = st["alpha_algorithm"]
        if alg == ADD:
            assert self.alpha_schedule is None
            return torch.lerp(h, s, clamp01(a))
        if alg == MULTIPLY:
            assert self.alpha_schedule is None
            return h * (1 + clamp01(a) * torch.tanh(s - seed_input))
        if alg == GATE:
            assert self.alpha_schedule is not None, "GATE without gate module"
            g = self.alpha_schedule.get_alpha_for_blend(seed_input)
            return torch.lerp(h, s, clamp01(clamp01(a) * clamp01(g)))
        raise ValueError(alg)


class MorphogeneticModel(nn.Module):
    def __init__(self, host, slots):
        super().__init__()
        self.host = host
        self.seed_slots = nn.ModuleDict()
        for sid in slots:  # registration order = state_dict order
            self.seed_slots[sid] = SeedSlot(sid, host.segment_channels[sid])
        self.timeline = [s for s in host.execution_order() if s in self.seed_slots]

    def forward(self, x, overrides=None):
        overrides = overrides or {}
        assert set(overrides) <= set(self.seed_slots)
        if not self.timeline:
            return self.host(x)
        prev = None
        for sid in self.timeline:
            x = self.host.forward_to_segment(sid, x, prev)
            x = self.seed_slots[sid](x, alpha_override=overrides.get(sid))
            prev = sid
        return self.host.forward_from_segment(prev, x)


# ---------------------------------------------------------------------------------------------
# weight randomisation: every parameter and BN statistic, including esper's zero-inits
# ---------------------------------------------------------------------------------------------
NORM_MODULES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def uniform_(t, lo, hi):
    with torch.no_grad():
        t.copy_(torch.rand(t.shape) * (hi - lo) + lo)


def randomise(module, gain=1.0):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = gain * math.sqrt(3.0 / fan_in)  # unit-variance-preserving uniform
            uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                uniform_(m.bias, -0.3, 0.3)
        elif isinstance(m, NORM_MODULES):
            uniform_(m.weight, 0.6, 1.4)
            uniform_(m.bias, -0.3, 0.3)
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.copy_(torch.randn(m.num_features) * 0.3)
                    uniform_(m.running_var, 0.4, 1.6)
                    m.num_batches_tracked.zero_()
        elif isinstance(m, nn.Embedding):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape) * 0.6)
    for name, p in module.named_parameters():
        if name == "scale" or name.endswith(".scale"):
            with torch.no_grad():
                sign = 1.0 if torch.rand(()) < 0.5 else -1.0
                p.fill_(sign * (0.4 + 0.8 * torch.rand(()).item()))
    if isinstance(module, CnnAttention):  # SE excitation bias: keep the gate off saturation
        uniform_(module.fc[2].bias, -1.0, 2.0)


# ---------------------------------------------------------------------------------------------
# extra state (esper-state-dict.md s6; kasmina-behaviour.md s1.4-1.5, s2.2, s7.3)
# ---------------------------------------------------------------------------------------------
T0 = datetime(2026, 6, 21, 9, 0, 0, tzinfo=timezone.utc)


def iso(minutes, micro=0):
    return (T0 + timedelta(minutes=minutes, microseconds=micro)).isoformat()


def sigmoid_safe(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def curve_progress(t, curve, k):
    t = min(max(t, 0.0), 1.0)
    if curve == LINEAR:
        return t
    if curve == COSINE:
        return 0.5 * (1.0 - math.cos(math.pi * t))
    lo, hi = sigmoid_safe(-k / 2), sigmoid_safe(k / 2)
    if hi - lo == 0.0:
        return t
    return (sigmoid_safe(k * (t - 0.5)) - lo) / (hi - lo)


def controller(alpha=0.0, start=0.0, target=0.0, mode=HOLD, curve=LINEAR, steep=12.0, total=0,
               done=0):
    return {"alpha": alpha, "alpha_start": start, "alpha_target": target, "alpha_mode": mode,
            "alpha_curve": curve, "alpha_steepness": steep, "alpha_steps_total": total,
            "alpha_steps_done": done}


def ramp(target, tempo, ticks, curve, steep=12.0):
    """Controller after start_blending (alpha 0 -> target over tempo ticks) and `ticks` steps."""
    if ticks >= tempo:
        return controller(target, 0.0, target, HOLD, curve, steep, tempo, tempo)
    p = curve_progress(ticks / tempo, curve, steep)
    a = min(max(0.0 + (target - 0.0) * p, 0.0), 1.0)
    a = min(max(a, 0.0), target)
    return controller(a, 0.0, target, UP, curve, steep, tempo, ticks)


class SlotPlan:
    """One slot of a case. scen: None (empty) or a tuple:
    ("GERMINATED",) ("TRAINING",) ("BLENDING", ticks) ("BLEND_HOLD", target) ("HOLDING",)
    ("FOSSILIZED",) ("PRUNED", from_stage) ("EMBARGOED",) ("RESETTING",)
    blend: "linear" | "sigmoid" (ignored for GATE, which is always "gated"); tempo: ramp ticks."""

    def __init__(self, slot_id, bp=None, alg=ADD, scen=None, blend="linear", tempo=5):
        self.slot_id, self.bp, self.alg, self.scen = slot_id, bp, alg, scen
        self.blend = "gated" if alg == GATE else blend
        assert self.blend != "sigmoid" or alg == ADD
        self.tempo = tempo

    @property
    def stage(self):
        return None if self.scen is None else globals()[self.scen[0].replace("BLEND_HOLD",
                                                                           "BLENDING")]


def build_extra_state(plan, topology, host_params, seed_params, idx):
    """The slot's get_extra_state() dict for a self-consistent lifecycle position."""
    if plan.scen is None:
        return {"_extra_state_version": 1, "isolate_gradients": False,
                "blend_algorithm_id": None, "blend_tempo_epochs": None,
                "blend_alpha_target": None, "resolved_topology": None, "seed_state": None,
                "alpha_schedule_config": None}
    kind = plan.scen[0]
    curve = SIGMOID if plan.blend == "sigmoid" else LINEAR
    blend_target = plan.scen[1] if kind == "BLEND_HOLD" else 1.0
    base = 10 * idx  # distinct timestamps per slot
    hist = [(GERMINATED, iso(base, 250000 * (idx % 3)))]
    m = {"_schema_version": 2, "epochs_total": 0, "epochs_in_current_stage": 0,
         "initial_val_accuracy": 0.0, "current_val_accuracy": 0.0, "best_val_accuracy": 0.0,
         "accuracy_at_stage_start": 0.0, "accuracy_at_blending_start": 0.0,
         "gradient_norm_avg": 0.0, "current_alpha": 0.0, "alpha_ramp_step": 0,
         "counterfactual_contribution": None, "_prev_contribution": None,
         "contribution_velocity": 0.0, "_blending_started": False,
         "seed_gradient_norm_ratio": 0.0, "host_param_count": host_params,
         "seed_param_count": seed_params, "interaction_sum": 0.0, "boost_received": 0.0,
         "upstream_alpha_sum": 0.0, "downstream_alpha_sum": 0.0}
    ctl = controller()
    isolate = False
    gate = False
    prev_epochs = 0
    epochs_in = 0
    measured = False
    if kind == "GERMINATED":
        stage, prev = GERMINATED, DORMANT
    else:
        # -> TRAINING
        hist.append((TRAINING, iso(base + 1)))
        isolate = True
        acc = 40.0 + idx
        m.update(epochs_total=3, initial_val_accuracy=acc - 2.0, current_val_accuracy=acc,
                 best_val_accuracy=acc, accuracy_at_stage_start=acc - 2.0,
                 gradient_norm_avg=0.42, seed_gradient_norm_ratio=0.9)
        measured = True
        stage, prev, prev_epochs, epochs_in = TRAINING, GERMINATED, 0, 3
        path = kind
        if kind == "PRUNED":
            path = plan.scen[1]
        if kind in ("EMBARGOED", "RESETTING"):
            path = "TRAINING"
        if path in ("BLENDING", "BLEND_HOLD", "HOLDING", "FOSSILIZED"):
            hist.append((BLENDING, iso(base + 2)))
            isolate = topology == "cnn"
            gate = plan.alg == GATE
            m.update(accuracy_at_blending_start=acc, _blending_started=True,
                     accuracy_at_stage_start=acc)
            stage, prev, prev_epochs = BLENDING, TRAINING, epochs_in
            if path == "BLENDING":
                ticks = plan.scen[1] if kind == "BLENDING" else 2
                ctl = ramp(1.0, plan.tempo, ticks, curve)
                epochs_in = ticks
            else:
                ctl = ramp(blend_target, plan.tempo, plan.tempo, curve)
                epochs_in = plan.tempo
            m.update(epochs_total=3 + epochs_in, current_val_accuracy=acc + 1.5,
                     best_val_accuracy=acc + 1.5, current_alpha=ctl["alpha"],
                     alpha_ramp_step=ctl["alpha_steps_done"],
                     counterfactual_contribution=0.75, _prev_contribution=0.5,
                     contribution_velocity=0.25, interaction_sum=0.1, upstream_alpha_sum=0.3)
        if path in ("HOLDING", "FOSSILIZED"):
            hist.append((HOLDING, iso(base + 3, 123456)))
            ctl = controller(1.0, 1.0, 1.0, HOLD, curve, 12.0, plan.tempo, plan.tempo)
            m.update(current_alpha=1.0, accuracy_at_stage_start=acc + 1.5)
            stage, prev, prev_epochs, epochs_in = HOLDING, BLENDING, epochs_in, 2
            m["epochs_total"] += 2
        if path == "FOSSILIZED":
            hist.append((FOSSILIZED, iso(base + 4)))
            stage, prev, prev_epochs, epochs_in = FOSSILIZED, HOLDING, epochs_in, 1
            m["epochs_total"] += 1
        if kind in ("PRUNED", "EMBARGOED", "RESETTING"):
            hist.append((PRUNED, iso(base + 5)))
            stage, prev, prev_epochs, epochs_in = PRUNED, stage, epochs_in, 0
            ctl = controller(0.0, 0.0, 0.0, HOLD, ctl["alpha_curve"], ctl["alpha_steepness"],
                             0, 0)
            isolate, gate = False, False
            m["current_alpha"] = 0.0
            if kind in ("EMBARGOED", "RESETTING"):
                hist.append((EMBARGOED, iso(base + 6)))
                stage, prev, prev_epochs, epochs_in = EMBARGOED, PRUNED, 0, 2
                m["epochs_total"] += 2
            if kind == "RESETTING":
                hist.append((RESETTING, iso(base + 7)))
                stage, prev, prev_epochs, epochs_in = RESETTING, EMBARGOED, 5, 0
                m["epochs_total"] += 5
    m["epochs_in_current_stage"] = epochs_in
    alpha = ctl["alpha"]
    total, done = ctl["alpha_steps_total"], ctl["alpha_steps_done"]
    velocity = 0.0 if ctl["alpha_mode"] == HOLD or total == 0 else \
        (ctl["alpha_target"] - ctl["alpha_start"]) / total
    telemetry = {
        "schema_version": 1, "seed_id": "%s-%s" % (plan.slot_id, plan.bp),
        "blueprint_id": plan.bp, "layer_id": "",
        "gradient_norm": 0.42 if measured else None,
        "gradient_health": 1.0 if measured else None,
        "has_vanishing": False if measured else None,
        "has_exploding": False if measured else None,
        "accuracy": m["current_val_accuracy"],
        "accuracy_delta": 0.0 if stage in (GERMINATED, TRAINING) else
        m["current_val_accuracy"] - m["accuracy_at_stage_start"],
        "epochs_in_stage": epochs_in, "stage": stage, "alpha": alpha,
        "alpha_target": ctl["alpha_target"], "alpha_mode": ctl["alpha_mode"],
        "alpha_steps_total": total, "alpha_steps_done": done,
        "time_to_target": max(total - done, 0), "alpha_velocity": velocity,
        "alpha_algorithm": plan.alg, "epoch": m["epochs_total"], "max_epochs": 25,
        "captured_at": iso(base + 8, 654321), "blend_tempo_epochs": plan.tempo,
        "blending_velocity": alpha / epochs_in if stage == BLENDING and epochs_in > 0 else 0.0,
        "alpha_curve": CURVE_NAME[ctl["alpha_curve"]]}
    seed_state = {
        "seed_id": "%s-%s" % (plan.slot_id, plan.bp), "blueprint_id": plan.bp,
        "slot_id": plan.slot_id, "stage": stage, "previous_stage": prev,
        "stage_entered_at": hist[-1][1], "alpha": alpha,
        "stage_history": [[s, t] for s, t in hist], "metrics": m, "telemetry": telemetry,
        "alpha_controller": ctl, "alpha_algorithm": plan.alg,
        "blend_tempo_epochs": plan.tempo, "is_healthy": True, "is_paused": False,
        "previous_epochs_in_stage": prev_epochs}
    assert stage == plan.stage, (stage, plan.scen)
    return {"_extra_state_version": 1, "isolate_gradients": isolate,
            "blend_algorithm_id": plan.blend, "blend_tempo_epochs": plan.tempo,
            "blend_alpha_target": blend_target, "resolved_topology": topology,
            "seed_state": seed_state,
            "alpha_schedule_config": {"algorithm_id": "gated", "total_steps": plan.tempo,
                                      "current_step": 0} if gate else None}


# ---------------------------------------------------------------------------------------------
# case construction
# ---------------------------------------------------------------------------------------------
def n_params_unique(module):
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def build_model(topology, cfg, plans, register):
    if topology == "cnn":
        host = CNNHost(cfg["num_classes"], cfg["n_blocks"], cfg["base_channels"],
                       cfg["pool_layers"], cfg["kernel_size"], cfg["in_channels"])
    else:
        host = TransformerHost(**cfg)
    randomise(host)
    model = MorphogeneticModel(host, register)
    host_params = n_params_unique(host)
    if cfg in (CNN_CFG, TF48):  # esper-state-dict.md s2/s3 concrete counts
        assert host_params == {id(CNN_CFG): 6418, id(TF48): 91104}[id(cfg)], host_params
    by_id = {p.slot_id: p for p in plans}
    assert set(by_id) == set(register)
    for idx, sid in enumerate(register):
        plan, slot = by_id[sid], model.seed_slots[sid]
        c = slot.channels
        seed_params = 0
        if plan.scen is not None:
            table = CNN_BLUEPRINTS if topology == "cnn" else TF_BLUEPRINTS
            counts = CNN_PARAMS if topology == "cnn" else TF_PARAMS
            seed_params = counts[plan.bp](c)
            if plan.stage in SEED_MODULE_STAGES:
                seed = table[plan.bp](c)
                randomise(seed)
                assert sum(p.numel() for p in seed.parameters()) == seed_params, plan.bp
                slot.seed = seed
        slot.extra = build_extra_state(plan, topology, host_params, seed_params, idx)
        if slot.extra["alpha_schedule_config"] is not None:
            assert slot.seed is not None
            gate = GatedBlend(c, topology, plan.tempo)
            randomise(gate)
            slot.alpha_schedule = gate
    model.eval()
    return model


def override_tensor(topology, values, b):
    rows = torch.tensor([v for v in values for _ in range(b)], dtype=torch.float32)
    return rows.view(-1, 1, 1, 1) if topology == "cnn" else rows.view(-1, 1, 1)


def max_abs(t):
    return t.abs().max().item()


def run_case(name, topology, cfg, plans, inp, description, fused=None, register=None):
    """fused: dict slot_id -> list of K override values (None: no fused part)."""
    register = register if register is not None else [p.slot_id for p in plans]
    model = build_model(topology, cfg, plans, register)
    sd = model.state_dict()
    with torch.no_grad():
        expected = model(inp)
        host_only = model.host(inp)
        for s in model.seed_slots.values():  # segment routing == plain host when seedless
            s.disabled = True
        routed = model(inp)
        assert torch.equal(routed, host_only) or max_abs(routed - host_only) < 1e-5, name
        for s in model.seed_slots.values():
            s.disabled = False
        assert torch.isfinite(expected).all(), name
        mx = max_abs(expected)
        assert 0.1 < mx < 100.0, (name, mx)
        # every live seed with alpha > 0 (non-noop) moves the output
        live = []
        for sid, slot in model.seed_slots.items():
            st = slot.state
            if slot.seed is None or st is None or st["stage"] not in ACTIVE:
                continue
            if st["stage"] == TRAINING or st["alpha"] <= 0.0:
                continue
            if st["blueprint_id"] == "noop":
                continue
            slot.disabled = True
            ablated = model(inp)
            slot.disabled = False
            d = max_abs(expected - ablated)
            assert d > 1e-3, (name, sid, d)
            live.append((sid, d))
        if live:
            assert max_abs(expected - host_only) > 1e-3, name

    tensors = []
    for k, v in sd.items():
        t = v.detach().clone()
        if k.endswith("num_batches_tracked"):
            assert t.dtype == torch.int64 and t.dim() == 0
        tensors.append((k, t))
    meta = {"seed_slots.%s._extra_state" % sid: json.dumps(model.seed_slots[sid].extra,
                                                           separators=(",", ":"))
            for sid in register}
    size = write_safetensors(os.path.join(OUTDIR, name + ".weights.safetensors"), tensors, meta)

    spec = {"topology": topology, topology: cfg, "slots": list(register)}
    io = [("input", inp), ("expected", expected)]
    io_meta = {"spec": json.dumps(spec, separators=(",", ":")), "description": description}
    if fused:
        k_cfg = len(next(iter(fused.values())))
        b = inp.shape[0]
        reps = (k_cfg,) + (1,) * (inp.dim() - 1)
        finp = inp.repeat(*reps)
        with torch.no_grad():
            fout = model(finp, {sid: override_tensor(topology, vals, b)
                                for sid, vals in fused.items()})
            seq = []
            for kk in range(k_cfg):
                seq.append(model(inp, {sid: torch.tensor(vals[kk], dtype=torch.float32)
                                       for sid, vals in fused.items()}))
            seq = torch.cat(seq, 0)
        err = max_abs(fout - seq)
        # batch-size dependent GEMM blocking: equal to ~1 ulp of the output scale
        assert err <= 1e-6 * max(1.0, max_abs(seq)), (name, err)
        FUSED_ERR[name] = err
        assert torch.isfinite(seq).all()
        # the configurations differ from each other (the overrides matter)
        for kk in range(1, k_cfg):
            assert max_abs(seq[kk * b:(kk + 1) * b] - seq[:b]) > 1e-3, (name, kk)
        io += [("fused.input", finp), ("fused.expected", seq)]
        for sid, vals in fused.items():
            io.append(("fused.alpha." + sid,
                       torch.tensor([v for v in vals for _ in range(b)], dtype=torch.float32)))
        io_meta["fused"] = json.dumps({"K": k_cfg, "B": b, "overrides": fused},
                                      separators=(",", ":"))
    size += write_safetensors(os.path.join(OUTDIR, name + ".io.safetensors"), io, io_meta)
    lines = []
    for sid in register:
        p = {q.slot_id: q for q in plans}[sid]
        st = model.seed_slots[sid].state
        if st is None:
            lines.append("%s empty" % sid)
        else:
            lines.append("%s %s/%s %s a=%.4g%s" % (
                sid, p.bp, ALG_NAME[p.alg], STAGE_NAME[st["stage"]], st["alpha"],
                " +gate" if model.seed_slots[sid].alpha_schedule is not None else ""))
    print("%-22s %8d bytes  max|y| %7.3f  %s" % (name, size, mx, "; ".join(lines)))
    CASES.append((name, topology, description, lines, bool(fused)))
    return size


CASES = []
FUSED_ERR = {}

CNN_CFG = {"num_classes": 10, "n_blocks": 3, "base_channels": 8, "pool_layers": 3,
           "kernel_size": 3, "in_channels": 3}
CNN_POOL2_CFG = dict(CNN_CFG, pool_layers=2)
TF48 = {"vocab_size": 97, "n_embd": 48, "n_head": 6, "n_layer": 3, "block_size": 32,
        "num_segments": 3}
TF24 = {"vocab_size": 97, "n_embd": 24, "n_head": 3, "n_layer": 3, "block_size": 32,
        "num_segments": 3}
CNN_SLOTS_ROW_MAJOR = ["r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2"]
CNN_EXEC = ["r0c0", "r1c0", "r0c1", "r1c1", "r0c2", "r1c2"]  # channels 8 8 16 16 32 32
CNN_BPS = ["noop", "norm", "attention", "depthwise", "bottleneck", "conv_small", "conv_light",
           "conv_heavy"]
TF_BPS = ["noop", "norm", "lora", "lora_large", "attention", "mlp_small", "mlp",
          "flex_attention"]
ALGS = [ADD, MULTIPLY, GATE]

# live scenarios cycled over the combo slots: (scen, blend for ADD, tempo)
LIVE = [(("BLENDING", 2), "linear", 5),     # alpha 0.4, UP
        (("HOLDING",), "linear", 5),        # alpha 1
        (("BLENDING", 1), "sigmoid", 3),    # sigmoid k=12, 1/3 -> 0.117310, UP
        (("FOSSILIZED",), "linear", 8),     # alpha 1
        (("BLEND_HOLD", 0.7), "linear", 3),  # partial target reached, HOLD at 0.7
        (("BLENDING", 5), "sigmoid", 8)]    # alpha 0.660920-ish (5/8), UP


def cnn_input(b=3):
    return torch.randn(b, 3, 16, 16)


def tf_input(cfg, t, b=2):
    return torch.randint(0, cfg["vocab_size"], (b, t), dtype=torch.int64)


def cnn_cases():
    total = 0
    # 24 (blueprint, algorithm) combos; blueprint b with algorithm a sits at channel group
    # (b + a) % 3 (C = 8, 16, 32), so every blueprint is checked at all three widths.
    models = [[None] * 6 for _ in range(4)]
    for g in range(3):
        combos = [(b, a) for b in range(8) for a in range(3) if (b + a) % 3 == g]
        for j, (b, a) in enumerate(combos):
            models[(j + g) % 4][2 * g + j // 4] = (CNN_BPS[b], ALGS[a])
    seen = {(bp, alg): CNN_EXEC.index(s) // 2 for row in models
            for s, (bp, alg) in zip(CNN_EXEC, row)}
    assert len(seen) == 24  # every (blueprint, algorithm) once ...
    for bp in CNN_BPS:  # ... and every blueprint at C = 8, 16 and 32
        assert sorted(seen[(bp, a)] for a in ALGS) == [0, 1, 2], bp
    for mi, row in enumerate(models):
        plans = []
        for si, (bp, alg) in enumerate(row):
            scen, blend, tempo = LIVE[(mi + si) % len(LIVE)]
            plans.append(SlotPlan(CNN_EXEC[si], bp, alg, scen,
                                  blend if alg == ADD else "linear", tempo))
        plans.sort(key=lambda p: CNN_SLOTS_ROW_MAJOR.index(p.slot_id))
        desc = "CNN base 8, 6 live slots: " + ", ".join(
            "%s=%s/%s" % (p.slot_id, p.bp, ALG_NAME[p.alg]) for p in plans)
        total += run_case("cnn_combo%d" % mi, "cnn", CNN_CFG, plans, cnn_input(), desc)

    plans = [SlotPlan("r0c0", "conv_light", ADD, ("TRAINING",)),
             SlotPlan("r0c1", "conv_small", ADD, ("PRUNED", "BLENDING")),
             SlotPlan("r0c2", "bottleneck", GATE, ("BLEND_HOLD", 0.7), tempo=3),
             SlotPlan("r1c0", "depthwise", MULTIPLY, ("GERMINATED",)),
             SlotPlan("r1c1"),
             SlotPlan("r1c2", "attention", GATE, ("TRAINING",))]
    total += run_case("cnn_stages", "cnn", CNN_CFG, plans, cnn_input(),
                      "CNN lifecycle stages: TRAINING STE (ADD, and GATE without gate), "
                      "GERMINATED (seed keys, not run), PRUNED (state only), empty, "
                      "BLENDING at partial target 0.7 with gate")

    plans = [SlotPlan("r0c0", "depthwise", GATE, ("BLENDING", 3), tempo=5),
             SlotPlan("r1c1", "conv_small", ADD, ("RESETTING",)),
             SlotPlan("r0c2", "bottleneck", MULTIPLY, ("HOLDING",)),
             SlotPlan("r1c0", "conv_light", ADD, ("EMBARGOED",))]
    total += run_case("cnn_pool2_sparse", "cnn", CNN_POOL2_CFG, plans, cnn_input(),
                      "CNN pool_layers=2 (no r1c2, block 2 unpooled), 4 of 5 slots registered "
                      "out of order; EMBARGOED and RESETTING state-only slots",
                      register=["r0c2", "r1c1", "r0c0", "r1c0"])

    total += run_case("cnn_host_only", "cnn", CNN_CFG, [], cnn_input(),
                      "CNN with no registered slots: plain host forward", register=[])

    plans = [SlotPlan("r0c0", "conv_light", ADD, ("BLENDING", 2), blend="sigmoid", tempo=5),
             SlotPlan("r0c1", "attention", GATE, ("HOLDING",)),
             SlotPlan("r0c2", "conv_small", ADD, ("PRUNED", "HOLDING")),
             SlotPlan("r1c0", "depthwise", MULTIPLY, ("TRAINING",)),
             SlotPlan("r1c1", "conv_small", ADD, ("FOSSILIZED",)),
             SlotPlan("r1c2", "bottleneck", ADD, ("TRAINING",))]
    a0 = ramp(1.0, 5, 2, SIGMOID)["alpha"]  # r0c0's current alpha
    fused = {"r0c0": [a0, 0.0, 1.0], "r1c0": [0.0, 0.25, 1.0], "r0c1": [1.0, 0.5, 0.0]}
    total += run_case("cnn_fused_a", "cnn", CNN_CFG, plans, cnn_input(),
                      "CNN fused K=3: overrides on BLENDING ADD (current, 0, 1), TRAINING "
                      "MULTIPLY (bypasses STE), HOLDING GATE; FOSSILIZED and TRAINING slots "
                      "without override", fused=fused)

    plans = [SlotPlan("r0c0"),
             SlotPlan("r0c1", "conv_heavy", GATE, ("BLEND_HOLD", 0.7), tempo=3),
             SlotPlan("r0c2", "bottleneck", MULTIPLY, ("BLENDING", 1), tempo=3),
             SlotPlan("r1c0", "norm", MULTIPLY, ("HOLDING",)),
             SlotPlan("r1c1", "conv_light", ADD, ("GERMINATED",)),
             SlotPlan("r1c2", "conv_small", GATE, ("TRAINING",))]
    fused = {"r1c0": [0.25, 1.0, 0.0], "r0c1": [0.0, 0.7, 1.0], "r1c1": [1.0, 0.5, 0.25]}
    total += run_case("cnn_fused_b", "cnn", CNN_CFG, plans, cnn_input(),
                      "CNN fused K=3: overrides on HOLDING MULTIPLY, partial-target GATE, and "
                      "a GERMINATED slot (ignored); empty slot, TRAINING GATE STE, BLENDING "
                      "MULTIPLY without override", fused=fused)
    return total


def tf_cases():
    total = 0
    # 24 combos on 8 models x 3 slots: slot s uses algorithm s, blueprint (m + 3 s) % 8.
    # T alternates 7 / 32 by model, so each blueprint runs at both lengths.
    assert len({(TF_BPS[(mi + 3 * si) % 8], si) for mi in range(8) for si in range(3)}) == 24
    for mi in range(8):
        plans = []
        for si in range(3):
            bp = TF_BPS[(mi + 3 * si) % 8]
            alg = ALGS[si]
            scen, blend, tempo = LIVE[(mi + 2 * si) % len(LIVE)]
            plans.append(SlotPlan("r0c%d" % si, bp, alg, scen,
                                  blend if alg == ADD else "linear", tempo))
        t = 7 if mi % 2 == 0 else 32
        desc = "transformer D=24 T=%d, 3 live slots: " % t + ", ".join(
            "%s=%s/%s" % (p.slot_id, p.bp, ALG_NAME[p.alg]) for p in plans)
        total += run_case("tf_combo%d" % mi, "transformer", TF24, plans, tf_input(TF24, t),
                          desc)

    plans = [SlotPlan("r0c0", "mlp", GATE, ("GERMINATED",)),
             SlotPlan("r0c1", "flex_attention", GATE, ("BLEND_HOLD", 0.5), tempo=3),
             SlotPlan("r0c2")]
    total += run_case("tf_stages", "transformer", TF24, plans, tf_input(TF24, 32),
                      "transformer D=24 T=32: GERMINATED GATE seed (seed keys, no gate keys, "
                      "not run), flex_attention GATE at partial target 0.5, empty slot")

    plans = [SlotPlan("r0c0", "attention", ADD, ("TRAINING",)),
             SlotPlan("r0c1", "lora", ADD, ("PRUNED", "BLENDING")),
             SlotPlan("r0c2", "mlp_small", GATE, ("HOLDING",))]
    fused = {"r0c0": [0.0, 1.0, 0.25], "r0c2": [1.0, 0.0, 0.5]}
    total += run_case("tf_fused_a", "transformer", TF48, plans, tf_input(TF48, 7),
                      "transformer D=48 T=7 fused K=3: overrides on TRAINING attention ADD "
                      "(bypasses STE) and HOLDING mlp_small GATE; PRUNED slot", fused=fused)

    plans = [SlotPlan("r0c0", "lora_large", MULTIPLY, ("BLENDING", 2)),
             SlotPlan("r0c1", "norm", ADD, ("FOSSILIZED",)),
             SlotPlan("r0c2", "lora", MULTIPLY, ("TRAINING",))]
    fused = {"r0c0": [0.4, 0.0, 1.0], "r0c2": [0.25, 0.75, 0.0]}
    total += run_case("tf_fused_b", "transformer", TF48, plans, tf_input(TF48, 32),
                      "transformer D=48 T=32 fused K=3: overrides on BLENDING lora_large "
                      "MULTIPLY (current 0.4, 0, 1) and TRAINING lora MULTIPLY; FOSSILIZED norm "
                      "ADD without override", fused=fused)
    return total


def main():
    os.makedirs(OUTDIR, exist_ok=True)
    for f in os.listdir(OUTDIR):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(OUTDIR, f))
    print("torch %s" % torch.__version__)
    total = cnn_cases() + tf_cases()
    print("total %d bytes in %d cases" % (total, len(CASES)))
    print("fused vs sequential max |diff|: " + ", ".join(
        "%s %.3g" % kv for kv in sorted(FUSED_ERR.items())))
    assert total < 3300000


if __name__ == "__main__":
    main()
