#!/usr/bin/python3
"""PyTorch eager reference for bench_model: the same models, weights, inputs and workloads.

    torch_model.py DIR        then one command per stdin line, as `bench_model serve DIR`

DIR holds what `bench_model export DIR` wrote: cnn.safetensors / tf.safetensors (esper state_dict
names; each slot's _extra_state JSON in __metadata__ says blueprint, stage, alpha, algorithm) and
io.safetensors (inputs, targets and kasmina's outputs). The modules are the spec-derived esper
re-implementation in tests/golden/gen_kasmina.py (MorphogeneticModel, SeedSlot, hosts,
blueprints), in eval mode under torch.no_grad(). Commands "<row> <reps>": reps 0 = one untimed
warm-up call, whose output is checked against kasmina's ("check name=... max_rel_err=...":
max|torch - kasmina| / max|torch|; accuracies in points), then "ok <row>"; otherwise the median
of reps calls in bench_model's line format ("row name=... ms=... per_s=... unit=..."). Rows:

    cnn_forward      model(x), batch 128
    cnn_eval_k8      esper-style fused forward: x tiled K=8 times, per-row alpha tensors
                     [K*B,1,1,1] as alpha overrides, per-config mean cross-entropy and accuracy
    cnn_eval_k8_seq  eight sequential forwards, alphas set on the slots, loss/accuracy each
    tf_forward, tf_eval_k2, tf_eval_k2_seq   the same for the transformer (K = 2)

Threads: torch.set_num_threads(TORCH_THREADS) when that is set, else torch's default.
"""
import json
import os
import statistics
import struct
import sys
import time

import numpy as np

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # as shipped (gen_kasmina sets 1 at import)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "golden"))
import gen_kasmina as gk  # noqa: E402

torch.set_num_threads(int(os.environ.get("TORCH_THREADS") or DEFAULT_THREADS))


def openblas_core():
    """The kernels of the OpenBLAS that torch's BLAS runs on (Debian's libblas.so.3 is
    OpenBLAS; it chose them from OPENBLAS_CORETYPE or its CPU detection when it was loaded)."""
    import ctypes
    try:
        lib = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD)
    except OSError:
        return "none"
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_corename().decode()

NP = {"F32": "<f4", "I64": "<i8", "I32": "<i4", "F64": "<f8"}

# The same configs as bench_model.c.
CNN_SEEDS = ["r0c1", "r1c1", "r0c2"]
CNN_CONFIGS = [[1.0 if (c >> j) & 1 else 0.0 for j in range(3)] for c in range(8)]
TF_SEEDS = ["r0c0", "r0c1"]
TF_CONFIGS = [[0.5, 0.5], [0.0, 0.0]]
TF_SPEC = dict(vocab_size=50257, n_embd=384, n_head=6, n_layer=6, block_size=256,
               num_segments=3)


def read_safetensors(path):
    """-> (dict name -> torch tensor, metadata dict)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, d in header.items():
        b, e = d["data_offsets"]
        a = np.frombuffer(data, dtype=NP[d["dtype"]], count=(e - b) // np.dtype(NP[d["dtype"]])
                          .itemsize, offset=b).reshape(d["shape"])
        out[name] = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
    return out, meta


def build(topology, path):
    tensors, meta = read_safetensors(path)
    if topology == "cnn":
        host = gk.CNNHost(num_classes=10, n_blocks=3, base_channels=32, pool_layers=None,
                          kernel_size=3, in_channels=3)
        table = gk.CNN_BLUEPRINTS
    else:
        host = gk.TransformerHost(**TF_SPEC)
        table = gk.TF_BLUEPRINTS
    pre, suf = "seed_slots.", "._extra_state"
    slots = sorted(k[len(pre):-len(suf)] for k in meta if k.startswith(pre) and k.endswith(suf))
    model = gk.MorphogeneticModel(host, slots)
    for sid in slots:
        slot = model.seed_slots[sid]
        slot.extra = json.loads(meta[pre + sid + suf])
        st = slot.extra["seed_state"]
        if st is not None and st["stage"] in gk.SEED_MODULE_STAGES:
            slot.seed = table[st["blueprint_id"]](slot.channels)
        assert slot.extra.get("alpha_schedule_config") is None, "gated blends are not benched"
    res = model.load_state_dict(tensors, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("num_batches_tracked")]
    assert not missing and not res.unexpected_keys, (missing, res.unexpected_keys)
    if "host.head.weight" in tensors:  # tied: both names carry the same bytes
        assert torch.equal(tensors["host.head.weight"], tensors["host.tok_emb.weight"])
    assert model.host.head.weight is model.host.tok_emb.weight if topology == "tf" else True
    model.eval()
    return model


# TORCH_DEVICE=cuda runs the PyTorch side on the GPU (tests/bench/gpu.sh); default cpu.
DEV = torch.device(os.environ.get("TORCH_DEVICE") or "cpu")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def row(name, sec, items, unit):
    print("row name=%s ms=%.3f per_s=%.1f unit=%s" % (name, sec * 1e3, items / sec, unit),
          flush=True)


def rel(a, ref):
    a = a.cpu()
    return ((a - ref).abs().max() / ref.abs().max()).item()


def check(name, err, limit=1e-4, key="max_rel_err"):
    print("check name=%s %s=%.3g %s" % (name, key, err, "ok" if err <= limit else "FAIL"),
          flush=True)


def acc_check(name, acc, ref):
    """Accuracy in percentage points: one near-tie argmax flip moves it by 100/rows."""
    check(name, (torch.tensor(acc) - ref.double()).abs().max().item(), 1.0, "max_abs_diff_pts")


def loss_acc(logits, y, k):
    """Per-config mean cross-entropy and accuracy (%), rows of config c contiguous."""
    v = logits.shape[-1]
    lg = logits.reshape(-1, v)
    yt = y.reshape(-1)
    loss = F.cross_entropy(lg, yt, reduction="none").view(k, -1).mean(1)
    acc = (lg.argmax(-1) == yt).view(k, -1).double().mean(1) * 100
    return loss.tolist(), acc.tolist()


def eval_fused(model, x, y, seeds, configs):
    k, b = len(configs), x.shape[0]
    xt = x.repeat((k,) + (1,) * (x.dim() - 1))
    yt = y.repeat((k,) + (1,) * (y.dim() - 1))
    extra = (1, 1, 1) if x.dim() == 4 else (1, 1)
    ov = {s: torch.tensor([c[j] for c in configs for _ in range(b)]).view(-1, *extra).to(x.device)
          for j, s in enumerate(seeds)}
    logits = model(xt, ov)
    return (logits,) + loss_acc(logits, yt, k)


def eval_seq(model, x, y, seeds, configs):
    states = [model.seed_slots[s].extra["seed_state"] for s in seeds]
    keep = [st["alpha"] for st in states]
    losses, accs = [], []
    for c in configs:
        for st, a in zip(states, c):
            st["alpha"] = a
        l, a = loss_acc(model(x), y, 1)
        losses += l
        accs += a
    for st, a in zip(states, keep):
        st["alpha"] = a
    return losses, accs


def main():
    d = sys.argv[1]
    io, _ = read_safetensors(os.path.join(d, "io.safetensors"))
    cnn = build("cnn", os.path.join(d, "cnn.safetensors"))
    tf = build("tf", os.path.join(d, "tf.safetensors"))
    cnn.to(DEV)
    tf.to(DEV)
    cx, cy, tx, ty = (io[k].to(DEV) for k in ("cnn.x", "cnn.y", "tf.x", "tf.y"))
    kc, kt = len(CNN_CONFIGS), len(TF_CONFIGS)

    def check_cnn_forward(out):
        check("cnn_forward_logits", rel(out, io["ksm.cnn.logits"]))

    def check_cnn_eval(out):
        check("cnn_eval_logits", rel(out[0].view(kc, -1, 10), io["ksm.cnn.eval_logits"]))
        check("cnn_eval_loss", rel(torch.tensor(out[1]), io["ksm.cnn.eval_loss"].double()))
        acc_check("cnn_eval_acc", out[2], io["ksm.cnn.eval_acc"])

    def check_cnn_seq(out):
        check("cnn_eval_seq_loss", rel(torch.tensor(out[0]), io["ksm.cnn.eval_loss"].double()))
        acc_check("cnn_eval_seq_acc", out[1], io["ksm.cnn.eval_acc"])

    def check_tf_forward(out):
        check("tf_forward_logits_row0", rel(out[0], io["ksm.tf.logits0"]))

    def check_tf_eval(out):
        check("tf_eval_loss", rel(torch.tensor(out[0]), io["ksm.tf.eval_loss"].double()))
        acc_check("tf_eval_acc", out[1], io["ksm.tf.eval_acc"])

    # name -> (call, items, unit, check of the warm-up call's output)
    rows = {
        "cnn_forward": (lambda: cnn(cx), cx.shape[0], "img/s", check_cnn_forward),
        "cnn_eval_k8": (lambda: eval_fused(cnn, cx, cy, CNN_SEEDS, CNN_CONFIGS),
                        kc * cx.shape[0], "rows/s", check_cnn_eval),
        "cnn_eval_k8_seq": (lambda: eval_seq(cnn, cx, cy, CNN_SEEDS, CNN_CONFIGS),
                            kc * cx.shape[0], "rows/s", check_cnn_seq),
        "tf_forward": (lambda: tf(tx), tx.numel(), "tok/s", check_tf_forward),
        "tf_eval_k2": (lambda: eval_fused(tf, tx, ty, TF_SEEDS, TF_CONFIGS)[1:],
                       kt * tx.numel(), "tok/s", check_tf_eval),
        "tf_eval_k2_seq": (lambda: eval_seq(tf, tx, ty, TF_SEEDS, TF_CONFIGS),
                           kt * tx.numel(), "tok/s", None),
    }
    print("info torch=%s threads=%d device=%s openblas_core=%s"
          % (torch.__version__, torch.get_num_threads(), DEV, openblas_core()))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("quit"):
            break
        name, reps = line.split()
        reps = int(reps)
        if name not in rows:
            print("skip %s" % name, flush=True)
            continue
        fn, items, unit, chk = rows[name]
        with torch.no_grad():
            if reps == 0:
                out = fn()
                sync()
                if chk:
                    chk(out)
                del out
                print("ok %s" % name, flush=True)
                continue
            s = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                sync()
                s.append(time.perf_counter() - t0)
        row(name, statistics.median(s), items, unit)


if __name__ == "__main__":
    main()
