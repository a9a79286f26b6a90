#!/usr/bin/env python3
"""Training trajectories of a transformer host with seeds (PyTorch reference for TrainStep).

Regenerate (needs Debian's python3-torch; CI reads the committed files):

    /usr/bin/python3 tests/golden/gen_train_tf.py

The modules are esper-lite's own, imported from /work/esper-lite/src (or $ESPER_SRC) at
2016337e: kasmina/host.py's TransformerHost (CausalSelfAttention, MLP, TransformerBlock) and
kasmina/blueprints/transformer.py's seed factories (norm, lora, lora_large, attention,
mlp_small, mlp, flex_attention, noop). Debian's torch 1.13 lacks three APIs they use, shimmed
here without changing the math:
  - torch.compiler.disable: the identity decorator;
  - F.scaled_dot_product_attention: the reference formula softmax(q k^T / sqrt(hd) + causal
    mask), dropout on the weights (dropout_p, training), then @ v;
  - torch.nn.attention.flex_attention: flex_attention as the dense block-causal formula
    (esper's CPU-with-grad path calls SDPA anyway).
The slots, the extra state and the training loop are gen_train.py's (esper's SeedSlot.forward
with isolation, the STE, blends; process_train_batch: cross-entropy over [B*T, V], the tokens'
argmax, clip_grad_norm_ of the host then of each seed, SGD of the host then of each seed).

Dropout: nn.Dropout modules (host.drop, attn.resid_dropout, mlp.dropout) and SDPA's dropout_p
draw kasmina's counter-based masks (philox.py, from the definition in docs/training.md), keyed
by (init_seed, train_step, site, element index), so a case with p > 0 is reproducible.

Tiny model (odd sizes): vocab 17, n_embd 16, 2 heads, 2 layers in 2 segments (slots r0c0 after
layer 0, r0c1 after layer 1), block_size 8; batches of 3 sequences of 7 tokens; 5 steps.
Outputs tests/golden/train/tf_<name>.{weights,io}.safetensors as gen_train.py's, with x.<k> and
y.<k> token ids [3, 7] and metadata spec (transformer, dropout, init_seed), config, steps.
"""
import json
import math
import os
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_kasmina as gk  # noqa: E402
import gen_train as gt  # noqa: E402
import philox  # noqa: E402

ESPER_SRC = os.environ.get("ESPER_SRC", "/work/esper-lite/src")
OUTDIR = os.path.join(HERE, "train")
STEPS = 5
B, T = 3, 7
CFG = {"vocab_size": 17, "n_embd": 16, "n_head": 2, "n_layer": 2, "block_size": 8,
       "num_segments": 2}
INIT_SEED = 0xC0FFEE0012345678  # the model's init_seed: the dropout masks' key

# ---- dropout with kasmina's masks ----

DROP = {"p": 0.0, "step": 0, "attn_site": None}


def factors(site, shape, p):
    n = 1
    for d in shape:
        n *= d
    f = philox.factors(INIT_SEED, DROP["step"], site, n, p)
    return torch.from_numpy(f).view(*shape)


class KasminaDropout(nn.Module):
    """nn.Dropout(p) in training with the mask of one site."""

    def __init__(self, p, site):
        super().__init__()
        self.p, self.site = p, site

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return x * factors(self.site, x.shape, self.p)


def sdpa_reference(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """F.scaled_dot_product_attention's math (torch >= 2.0) for torch 1.13."""
    assert attn_mask is None
    tq, tk = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        i = torch.arange(tq).unsqueeze(1)
        j = torch.arange(tk).unsqueeze(0)
        s = s.masked_fill(j > i, float("-inf"))
    w = torch.softmax(s, dim=-1)
    if dropout_p > 0.0:
        w = w * factors(DROP["attn_site"], w.shape, dropout_p)
    return w @ v


def install_shims():
    if not hasattr(torch, "compiler"):
        torch.compiler = types.SimpleNamespace(disable=lambda f=None, **kw: f)
    F.scaled_dot_product_attention = sdpa_reference
    att = types.ModuleType("torch.nn.attention")
    flex = types.ModuleType("torch.nn.attention.flex_attention")

    def create_block_mask(fn, B=None, H=None, Q_LEN=None, KV_LEN=None, device=None):
        return ("causal", Q_LEN, KV_LEN)

    def flex_attention(q, k, v, block_mask=None):
        return sdpa_reference(q, k, v, is_causal=True)

    flex.create_block_mask = create_block_mask
    flex.flex_attention = flex_attention
    att.flex_attention = flex
    sys.modules["torch.nn.attention"] = att
    sys.modules["torch.nn.attention.flex_attention"] = flex
    sys.path.insert(0, ESPER_SRC)


install_shims()
from esper.kasmina.host import TransformerHost  # noqa: E402
from esper.kasmina.blueprints import BlueprintRegistry  # noqa: E402


def esper_host(dropout):
    host = TransformerHost(dropout=dropout, **CFG)
    host.drop = KasminaDropout(dropout, 0)
    for l, layer in enumerate(host.layers):
        layer.attn.resid_dropout = KasminaDropout(dropout, 2 + 3 * l)
        layer.mlp.dropout = KasminaDropout(dropout, 3 + 3 * l)

        def pre(mod, args, site=1 + 3 * l):
            DROP["attn_site"] = site
        layer.attn.register_forward_pre_hook(pre)
    return host


def build(plans, register, dropout):
    host = esper_host(dropout)
    gk.randomise(host)
    model = gk.MorphogeneticModel(host, register)
    host_params = gk.n_params_unique(host)
    by_id = {p.slot_id: p for p in plans}
    for idx, sid in enumerate(register):
        plan, slot = by_id[sid], model.seed_slots[sid]
        seed_params = 0
        if plan.scen is not None:
            seed_params = gk.TF_PARAMS[plan.bp](slot.channels)
            if plan.stage in gk.SEED_MODULE_STAGES:
                seed = BlueprintRegistry.create("transformer", plan.bp, slot.channels)
                gk.randomise(seed)
                assert sum(p.numel() for p in seed.parameters()) == seed_params, plan.bp
                slot.seed = seed
        slot.extra = gk.build_extra_state(plan, "transformer", host_params, seed_params, idx)
        if slot.extra["alpha_schedule_config"] is not None:
            gate = gk.GatedBlend(slot.channels, "transformer", plan.tempo)
            gk.randomise(gate)
            slot.alpha_schedule = gate
    return model


def run_case(name, plans, register, cfg, isolate=None, description="", down=(), dropout=0.0):
    torch.manual_seed(4321)
    DROP["p"] = dropout
    model = build(plans, register, dropout)
    for sid, iso in (isolate or {}).items():
        model.seed_slots[sid].extra["isolate_gradients"] = iso
    for sid in down:
        gt.blend_out(model.seed_slots[sid])
    sd0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"seed_slots.%s._extra_state" % sid: json.dumps(model.seed_slots[sid].extra,
                                                           separators=(",", ":"))
            for sid in register}
    gk.write_safetensors(os.path.join(OUTDIR, name + ".weights.safetensors"),
                         list(sd0.items()), meta)

    live = [sid for sid in register if model.seed_slots[sid].seed is not None and
            model.seed_slots[sid].state["stage"] in gk.SEED_MODULE_STAGES]
    tb = [sid for sid in live if model.seed_slots[sid].state["stage"] in (gk.TRAINING,
                                                                         gk.BLENDING)]
    host_ps = list(model.host.parameters())  # the tied embedding / head once
    assert sum(p.numel() for p in host_ps) == gk.n_params_unique(model.host)
    opt_h = torch.optim.SGD(host_ps, lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
    opt_s = {sid: torch.optim.SGD(gt.seed_params(model.seed_slots[sid]), lr=cfg["lr"],
                                  momentum=0.9, weight_decay=0.0)
             for sid in live if gt.seed_params(model.seed_slots[sid])}  # noop has none
    model.train()
    io, losses, correct, hnorm = [], [], [], []
    snorm = {sid: [] for sid in tb}
    for k in range(STEPS):
        DROP["step"] = k  # the model's train_step before this step
        x = torch.randint(0, CFG["vocab_size"], (B, T), dtype=torch.int64)
        y = torch.randint(0, CFG["vocab_size"], (B, T), dtype=torch.int64)
        io += [("x.%d" % k, x), ("y.%d" % k, y)]
        opt_h.zero_grad(set_to_none=True)
        for o in opt_s.values():
            o.zero_grad(set_to_none=True)
        out = gt.model_forward(model, x)
        vocab = out.size(-1)
        loss = F.cross_entropy(out.reshape(-1, vocab), y.reshape(-1))  # utils/loss.py "lm"
        loss.backward()
        losses.append(loss.item())
        correct.append(int(out.argmax(dim=-1).eq(y).sum().item()))
        hnorm.append(gt.norm64(host_ps))
        for sid in tb:
            snorm[sid].append(gt.norm64(gt.seed_params(model.seed_slots[sid])))
        if cfg["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(host_ps, cfg["max_grad_norm"])
            for sid in live:
                ps = [p for p in gt.seed_params(model.seed_slots[sid]) if p.grad is not None]
                if ps:
                    torch.nn.utils.clip_grad_norm_(ps, cfg["max_grad_norm"])
        opt_h.step()
        for o in opt_s.values():
            o.step()
    io += [("loss", torch.tensor(losses, dtype=torch.float32)),
           ("correct", torch.tensor(correct, dtype=torch.int64)),
           ("host_grad_norm", torch.tensor(hnorm, dtype=torch.float32))]
    for sid in tb:
        io.append(("seed_grad_norm." + sid, torch.tensor(snorm[sid], dtype=torch.float32)))
    moved = 0.0
    for k, v in model.state_dict().items():
        io.append(("final." + k, v.detach().clone()))
        if v.dtype == torch.float32:
            moved = max(moved, (v - sd0[k]).abs().max().item())
    assert moved > 1e-3, (name, moved)
    tcfg = dict(CFG, dropout=dropout)
    spec = {"topology": "transformer", "transformer": tcfg, "slots": list(register),
            "init_seed": str(INIT_SEED)}
    io_meta = {"spec": json.dumps(spec, separators=(",", ":")),
               "config": json.dumps(cfg, separators=(",", ":")),
               "steps": str(STEPS), "description": description}
    gk.write_safetensors(os.path.join(OUTDIR, name + ".io.safetensors"), io, io_meta)
    print("%-18s loss %s  correct %s  |dW|max %.3g  %s" % (
        name, " ".join("%.4f" % v for v in losses), correct, moved, description))


def main():
    torch.set_num_threads(1)
    os.makedirs(OUTDIR, exist_ok=True)
    for f in os.listdir(OUTDIR):
        if f.startswith("tf_") and f.endswith(".safetensors"):
            os.remove(os.path.join(OUTDIR, f))
    print("torch %s, esper from %s" % (torch.__version__, ESPER_SRC))
    P = gk.SlotPlan
    A, M, G = gk.ADD, gk.MULTIPLY, gk.GATE
    clip = {"lr": 0.05, "max_grad_norm": 1.0}
    noclip = {"lr": 0.05, "max_grad_norm": 0.0}
    run_case("tf_host_clip", [P("r0c0"), P("r0c1")], ["r0c0", "r0c1"], clip,
             description="host only (two empty slots), clip 1.0")
    run_case("tf_host_noclip", [], [], noclip, description="host only, no slots, no clipping")
    run_case("tf_ste", [P("r0c0", "lora", A, ("TRAINING",)),
                        P("r0c1", "mlp_small", A, ("TRAINING",))], ["r0c0", "r0c1"], clip,
             isolate={"r0c1": False},
             description="STE: lora isolated, mlp_small not isolated")
    run_case("tf_add", [P("r0c0", "attention", A, ("BLENDING", 2)),
                        P("r0c1", "norm", A, ("FOSSILIZED",), tempo=8)], ["r0c0", "r0c1"], clip,
             description="ADD: attention blending (not isolated), norm fossilized")
    run_case("tf_multiply", [P("r0c0", "mlp", M, ("BLENDING", 3)),
                             P("r0c1", "lora_large", M, ("HOLDING",))], ["r0c0", "r0c1"], clip,
             isolate={"r0c1": True},
             description="MULTIPLY: mlp blending, lora_large holding isolated")
    run_case("tf_gate", [P("r0c0", "flex_attention", G, ("BLENDING", 2)),
                         P("r0c1", "noop", G, ("BLENDING", 3))], ["r0c0", "r0c1"], clip,
             isolate={"r0c1": True},
             description="GATE: flex_attention blending, noop isolated (only its gate trains)")
    run_case("tf_freeze", [P("r0c0", "mlp_small", A, ("BLENDING", 2)),
                           P("r0c1", "norm", G, ("BLENDING", 3))], ["r0c0", "r0c1"], clip,
             down=("r0c0", "r0c1"),
             description="blend-out freeze (mode DOWN): mlp_small/ADD and norm/GATE frozen, "
                         "their ghost gradients reach the host")
    run_case("tf_seeds_noclip", [P("r0c0", "attention", A, ("TRAINING",)),
                                 P("r0c1", "lora", M, ("BLENDING", 2))], ["r0c0", "r0c1"], noclip,
             isolate={"r0c0": False},
             description="no clipping: STE attention not isolated, lora/MULTIPLY blending")
    run_case("tf_dropout", [P("r0c0", "mlp_small", A, ("BLENDING", 2)),
                            P("r0c1", "attention", G, ("HOLDING",))], ["r0c0", "r0c1"], clip,
             dropout=0.2,
             description="dropout 0.2 (kasmina's masks at every site of esper's host), "
                         "mlp_small/ADD blending, attention/GATE holding")


if __name__ == "__main__":
    main()
