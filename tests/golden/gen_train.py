#!/usr/bin/env python3
"""Training trajectories of esper-lite's process_train_batch (PyTorch reference for TrainStep).

Regenerate (needs Debian's python3-torch; CI reads the committed files):

    /usr/bin/python3 tests/golden/gen_train.py

Deterministic (fixed seed, 1 thread, CPU, float32). Reuses the modules of gen_kasmina.py (esper's
CNNHost, blueprints, GatedBlend, extra state) and adds what training changes
(/work/shared/spec/kasmina-training.md s1): model.train() (BatchNorm batch statistics and
running-stat updates), isolate_gradients (the seed input detached, also the MULTIPLY reference
and the gate's input), the STE, mean cross-entropy, clip_grad_norm_ of the host then of each
seed, torch.optim.SGD of the host then of each seed.

Output tests/golden/train/<name>.weights.safetensors (the initial state dict with extra state,
as LoadWeights takes it) and <name>.io.safetensors:
  x.<k> [B,3,8,8], y.<k> [B] I64 for steps k = 0..N-1;
  loss [N], correct [N] I64, host_grad_norm [N] (the float64 norm rounded to F32),
  seed_grad_norm.<slot> [N] for the seeds in TRAINING/BLENDING;
  final.<name> every parameter and buffer after N steps.
  metadata: spec (as gen_kasmina), config (lr, momentum, weight decay, max_grad_norm), steps.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_kasmina as gk  # noqa: E402

OUTDIR = os.path.join(HERE, "train")
STEPS = 5
BATCH = 8


def slot_forward(slot, h):
    """SeedSlot.forward in train mode with isolate_gradients (kasmina-behaviour.md s2.5)."""
    st = slot.state
    if slot.seed is None or st is None or st["stage"] not in gk.ACTIVE:
        return h
    seed_input = h.detach() if slot.extra["isolate_gradients"] else h
    s = slot.seed(seed_input)
    if st["stage"] == gk.TRAINING and st["alpha"] == 0.0:
        return h + (s - s.detach())
    a = torch.tensor(st["alpha"], dtype=h.dtype)
    alg = st["alpha_algorithm"]
    if alg == gk.ADD:
        return torch.lerp(h, s, gk.clamp01(a))
    if alg == gk.MULTIPLY:
        return h * (1 + gk.clamp01(a) * torch.tanh(s - seed_input))
    g = slot.alpha_schedule.get_alpha_for_blend(seed_input)
    return torch.lerp(h, s, gk.clamp01(gk.clamp01(a) * gk.clamp01(g)))


def model_forward(model, x):
    if not model.timeline:
        return model.host(x)
    prev = None
    for sid in model.timeline:
        x = model.host.forward_to_segment(sid, x, prev)
        x = slot_forward(model.seed_slots[sid], x)
        prev = sid
    return model.host.forward_from_segment(prev, x)


def seed_params(slot):
    ps = list(slot.seed.parameters())
    if slot.alpha_schedule is not None:
        ps += list(slot.alpha_schedule.parameters())
    return ps


def norm64(ps):
    return sum(p.grad.double().pow(2).sum().item() for p in ps if p.grad is not None) ** 0.5


def blend_out(slot):
    """The controller reversed towards 0 (schedule_prune): mode DOWN, the blend-out freeze on."""
    ctl = slot.extra["seed_state"]["alpha_controller"]
    a = ctl["alpha"]
    ctl.update(alpha_start=a, alpha_target=0.0, alpha_mode=gk.DOWN, alpha_steps_total=4,
               alpha_steps_done=0)
    tel = slot.extra["seed_state"]["telemetry"]
    tel.update(alpha_target=0.0, alpha_mode=gk.DOWN, alpha_steps_total=4, alpha_steps_done=0,
               time_to_target=4, alpha_velocity=-a / 4)
    for p in seed_params(slot):  # _set_blend_out_freeze(True)
        p.requires_grad_(False)


def run_case(name, plans, register, cfg, isolate=None, description="", down=()):
    torch.manual_seed(1234)
    model = gk.build_model("cnn", gk.CNN_CFG, plans, register)
    for sid, iso in (isolate or {}).items():
        model.seed_slots[sid].extra["isolate_gradients"] = iso
    for sid in down:
        blend_out(model.seed_slots[sid])
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
    host_ps = list(model.host.parameters())
    opt_h = torch.optim.SGD(host_ps, lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
    opt_s = {sid: torch.optim.SGD(seed_params(model.seed_slots[sid]), lr=cfg["lr"],
                                  momentum=0.9, weight_decay=0.0)
             for sid in live if seed_params(model.seed_slots[sid])}  # noop has none
    model.train()
    io, losses, correct, hnorm = [], [], [], []
    snorm = {sid: [] for sid in tb}
    for k in range(STEPS):
        x = torch.randn(BATCH, 3, 8, 8)
        y = torch.randint(0, 10, (BATCH,), dtype=torch.int64)
        io += [("x.%d" % k, x), ("y.%d" % k, y)]
        opt_h.zero_grad(set_to_none=True)
        for o in opt_s.values():
            o.zero_grad(set_to_none=True)
        out = model_forward(model, x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        losses.append(loss.item())
        correct.append(int((out.argmax(1) == y).sum().item()))
        hnorm.append(norm64(host_ps))
        for sid in tb:
            snorm[sid].append(norm64(seed_params(model.seed_slots[sid])))
        if cfg["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(host_ps, cfg["max_grad_norm"])
            for sid in live:
                ps = [p for p in seed_params(model.seed_slots[sid]) if p.grad is not None]
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
    spec = {"topology": "cnn", "cnn": gk.CNN_CFG, "slots": list(register)}
    io_meta = {"spec": json.dumps(spec, separators=(",", ":")),
               "config": json.dumps(cfg, separators=(",", ":")),
               "steps": str(STEPS), "description": description}
    gk.write_safetensors(os.path.join(OUTDIR, name + ".io.safetensors"), io, io_meta)
    print("%-16s loss %s  correct %s  |dW|max %.3g  %s" % (
        name, " ".join("%.4f" % v for v in losses), correct, moved, description))


def main():
    torch.set_num_threads(1)
    os.makedirs(OUTDIR, exist_ok=True)
    for f in os.listdir(OUTDIR):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(OUTDIR, f))
    print("torch %s" % torch.__version__)
    P = gk.SlotPlan
    clip = {"lr": 0.05, "max_grad_norm": 1.0}
    noclip = {"lr": 0.05, "max_grad_norm": 0.0}
    run_case("host_clip", [], [], clip, description="host only, clip 1.0")
    run_case("host_noclip", [], [], noclip, description="host only, no clipping")
    run_case("host_empty_slots", [P("r0c1"), P("r1c0")], ["r0c1", "r1c0"], clip,
             description="host only, two empty slots")
    run_case("ste", [P("r0c1", "norm", gk.ADD, ("TRAINING",)),
                     P("r1c0", "conv_light", gk.ADD, ("TRAINING",)),
                     P("r1c1", "conv_small", gk.ADD, ("GERMINATED",))],
             ["r0c1", "r1c0", "r1c1"], clip, isolate={"r1c0": False},
             description="STE: norm isolated, conv_light not isolated; a GERMINATED seed")
    run_case("add", [P("r0c0", "norm", gk.ADD, ("BLENDING", 2)),
                     P("r1c1", "conv_light", gk.ADD, ("HOLDING",)),
                     P("r0c2", "conv_small", gk.ADD, ("FOSSILIZED",), tempo=8)],
             ["r0c0", "r1c1", "r0c2"], clip, isolate={"r1c1": False},
             description="ADD: norm blending isolated, conv_light holding, conv_small fossilized")
    run_case("add_noclip", [P("r0c0", "conv_light", gk.ADD, ("BLENDING", 2)),
                            P("r1c1", "norm", gk.ADD, ("BLENDING", 3))],
             ["r0c0", "r1c1"], noclip, isolate={"r1c1": False},
             description="ADD without clipping")
    run_case("multiply", [P("r0c1", "conv_light", gk.MULTIPLY, ("BLENDING", 2)),
                          P("r1c0", "norm", gk.MULTIPLY, ("BLENDING", 3))],
             ["r0c1", "r1c0"], clip, isolate={"r1c0": False},
             description="MULTIPLY: conv_light isolated, norm not isolated")
    run_case("gate", [P("r0c1", "norm", gk.GATE, ("BLENDING", 2)),
                      P("r1c0", "conv_small", gk.GATE, ("BLENDING", 3))],
             ["r0c1", "r1c0"], clip, isolate={"r1c0": False},
             description="GATE: norm isolated, conv_small not isolated")
    run_case("freeze", [P("r0c1", "conv_light", gk.ADD, ("BLENDING", 2)),
                        P("r1c0", "norm", gk.GATE, ("BLENDING", 3)),
                        P("r1c1", "norm", gk.ADD, ("BLENDING", 2))],
             ["r0c1", "r1c0", "r1c1"], clip, isolate={"r0c1": False, "r1c0": False},
             down=("r0c1", "r1c0"),
             description="blend-out freeze (mode DOWN): conv_light/ADD and norm/GATE frozen, "
                         "their ghost gradients reach the host; norm/ADD trains")
    run_case("blueprints_a", [P("r0c0", "attention", gk.ADD, ("BLENDING", 2)),
                              P("r1c1", "depthwise", gk.MULTIPLY, ("BLENDING", 3)),
                              P("r0c2", "bottleneck", gk.GATE, ("BLENDING", 2))],
             ["r0c0", "r1c1", "r0c2"], clip, isolate={"r0c0": False, "r0c2": False},
             description="attention/ADD, depthwise/MULTIPLY isolated, bottleneck/GATE")
    run_case("blueprints_b", [P("r0c0", "depthwise", gk.ADD, ("BLENDING", 2)),
                              P("r0c1", "conv_heavy", gk.ADD, ("HOLDING",)),
                              P("r1c0", "bottleneck", gk.ADD, ("TRAINING",)),
                              P("r1c2", "attention", gk.ADD, ("TRAINING",))],
             ["r0c0", "r0c1", "r1c0", "r1c2"], clip,
             isolate={"r0c0": False, "r0c1": False, "r1c0": False},
             description="depthwise/ADD, conv_heavy holding, STE bottleneck and attention "
                         "(isolated)")
    run_case("conv_heavy_noclip", [P("r1c0", "conv_heavy", gk.MULTIPLY, ("BLENDING", 2)),
                                   P("r0c2", "noop", gk.ADD, ("BLENDING", 2))],
             ["r1c0", "r0c2"], noclip, isolate={"r1c0": False},
             description="conv_heavy/MULTIPLY, noop/ADD, no clipping")


if __name__ == "__main__":
    main()
