#!/usr/bin/python3
"""PyTorch side of bench_model: esper-lite's own code on the same models, weights and inputs.

    ESPER_SRC=/path/to/esper-lite torch_model.py DIR    then one command per stdin line, as
                                                         `bench_model serve DIR`

DIR holds what `bench_model export DIR` wrote: cnn.safetensors, cnn8.safetensors,
tf.safetensors (esper state_dict names; each slot's _extra_state JSON in __metadata__) and
io.safetensors (inputs, targets and kasmina's outputs). The models are esper's own
MorphogeneticModel, CNNHost / TransformerHost, SeedSlot and blueprints from the ESPER_SRC
checkout, loaded with esper's load_state_dict (esper_shims.py: the torch 1.13 shims and the
model construction), built on a row's first use. Commands "<row> <reps>": reps 0 = the
row's untimed warm-up, whose output is checked against kasmina's ("check name=...
max_rel_err=...": max|torch - kasmina| / max|torch|; accuracies in points; for a training row
two steps, each printing "loss name=<row> step=<k> loss=... correct=... total=..."), then
"ok <row>"; otherwise the median of reps calls in bench_model's line format ("row name=...
ms=... per_s=... unit=..."). Rows (what esper itself runs for each):

    cnn_forward      model(x), eval mode, torch.no_grad(), batch 128 (base-32 CNN)
    cnn8_forward     the same on esper's cifar_baseline host (base 8)
    cnn_eval_k8      vectorized_trainer's fused counterfactual validation: per-slot alpha
                     override vectors [K*B,1,1,1] (torch.full, then each config's rows filled),
                     process_fused_val_batch (x tiled K = 8 times, model.fused_forward,
                     loss_and_correct elementwise with CrossEntropyLoss(reduction="none"),
                     per-config loss and correct counts)
    cnn_eval_k8_seq  eight sequential validations: SeedSlot.force_alpha on the three seeds,
                     process_val_batch (model(x), loss_and_correct)
    tf_forward, tf_eval_k2, tf_eval_k2_seq   the same for the transformer (K = 2)
    cnn_train        process_train_batch on batch 128 with the optimizers of esper's trainer
                     (esper_shims.Trainer: env_factory's host SGD, batch_ops' seed SGDs, clip
                     1.0, gradient telemetry every 10 batches), then loss/correct read back
    tf_train         the same on the transformer, 8 x 256 tokens (lora + mlp seeds)

Threads: torch.set_num_threads(TORCH_THREADS) when that is set, else torch's default.
TORCH_DEVICE=cuda runs on the GPU (tests/bench/gpu.sh); default cpu.
"""
import contextlib
import os
import statistics
import sys
import time
import types

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import esper_shims as es  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # as shipped
torch.set_num_threads(int(os.environ.get("TORCH_THREADS") or DEFAULT_THREADS))
es.install()


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


# The same configs as bench_model.c (on = 1, off = 0; config c sets seed j on when bit j is set).
CNN_SEEDS = ["r0c1", "r1c1", "r0c2"]
CNN_CONFIGS = [[1.0 if (c >> j) & 1 else 0.0 for j in range(3)] for c in range(8)]
TF_SEEDS = ["r0c0", "r0c1"]
TF_CONFIGS = [[0.5, 0.5], [0.0, 0.0]]

DEV = torch.device(os.environ.get("TORCH_DEVICE") or "cpu")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def row(name, sec, items, unit):
    print("row name=%s ms=%.3f per_s=%.1f unit=%s" % (name, sec * 1e3, items / sec, unit),
          flush=True)


def rel(a, ref):
    a = a.detach().cpu().to(ref.dtype)
    return ((a - ref).abs().max() / ref.abs().max()).item()


def check(name, err, limit=1e-4, key="max_rel_err"):
    print("check name=%s %s=%.3g %s" % (name, key, err, "ok" if err <= limit else "FAIL"),
          flush=True)


def acc_check(name, acc, ref):
    """Accuracy in percentage points: one near-tie argmax flip moves it by 100/rows."""
    check(name, (torch.tensor(acc) - ref.double()).abs().max().item(), 1.0, "max_abs_diff_pts")


class Side:
    """One topology's esper model, its inputs and its environment state (esper_shims)."""

    def __init__(self, config, path, x, y, seeds, configs, train):
        self.model = es.build_model(config, path, device=DEV)
        self.task_type = es.CONFIGS[config][1]
        self.topology = es.CONFIGS[config][0]
        self.x, self.y, self.seeds, self.configs = x, y, seeds, configs
        self.t = es.training()
        if train:
            self.trainer = es.Trainer(self.model, self.task_type)
            self.env = self.trainer.env
        else:
            self.env = es.ParallelEnvState(model=self.model, env_device=str(DEV), stream=None)
        self.task_spec = types.SimpleNamespace(task_type=self.task_type,
                                                  topology=self.topology)
        self.val_criterion = nn.CrossEntropyLoss(reduction="none")
        self.criterion = nn.CrossEntropyLoss()

    def forward(self):
        self.model.eval()
        with torch.no_grad():
            return self.model(self.x)

    def overrides(self):
        """vectorized_trainer's alpha override vectors: each seed slot's current alpha, then
        each configuration's rows set to that configuration's alpha."""
        k, b = len(self.configs), self.x.shape[0]
        shape = (k * b, 1, 1, 1) if self.topology == "cnn" else (k * b, 1, 1)
        ov = {}
        for j, sid in enumerate(self.seeds):
            v = torch.full(shape, self.model.seed_slots[sid].alpha, device=DEV,
                           dtype=torch.float32)
            for c, cfg in enumerate(self.configs):
                v[c * b:(c + 1) * b].fill_(cfg[j])
            ov[sid] = v
        return ov

    def eval_fused(self):
        """-> (per-config losses, accuracies in %)."""
        k = len(self.configs)
        loss, correct, total = self.t.process_fused_val_batch(
            self.env, self.x, self.y, self.val_criterion, self.overrides(), k,
            task_spec=self.task_spec, loss_and_correct_fn=self.t.loss_and_correct)
        return loss.tolist(), (correct.double() * 100 / total).tolist()

    def fused_logits(self):
        k = len(self.configs)
        xt = self.x.repeat(k, *([1] * (self.x.dim() - 1)))
        if self.x.is_contiguous(memory_format=torch.channels_last):
            xt = xt.contiguous(memory_format=torch.channels_last)
        self.model.eval()
        with torch.inference_mode():
            return self.model.fused_forward(xt, self.overrides())

    def eval_seq(self):
        losses, accs = [], []
        for cfg in self.configs:
            with contextlib.ExitStack() as st:
                for sid, a in zip(self.seeds, cfg):
                    st.enter_context(self.model.seed_slots[sid].force_alpha(a))
                loss, correct, total = self.t.process_val_batch(
                    self.env, self.x, self.y, self.criterion, slots=list(self.seeds),
                    task_spec=self.task_spec, loss_and_correct_fn=self.t.loss_and_correct)
                losses.append(loss.item())
                accs.append(correct.item() * 100.0 / total)
        return losses, accs

    def train_step(self):
        return self.trainer.step(self.x, self.y)


def main():
    d = sys.argv[1]
    io, _ = es.read_safetensors(os.path.join(d, "io.safetensors"))
    cx, cy, tx, ty = (io[k].to(DEV) for k in ("cnn.x", "cnn.y", "tf.x", "tf.y"))
    kc, kt = len(CNN_CONFIGS), len(TF_CONFIGS)
    sides = {}

    def side(key):
        """Models are built on a row's first use (a server runs only some rows); the training
        rows have models of their own (they change their weights)."""
        if key not in sides:
            path = os.path.join(d, {"cnn": "cnn", "cnn8": "cnn8", "tf": "tf", "cnn_train": "cnn",
                                    "tf_train": "tf"}[key] + ".safetensors")
            cfg = {"cnn": "cnn32", "cnn8": "cifar_base8", "tf": "tinystories",
                   "cnn_train": "cnn32", "tf_train": "tinystories"}[key]
            tf = cfg == "tinystories"
            sides[key] = Side(cfg, path, tx if tf else cx, ty if tf else cy,
                              TF_SEEDS if tf else CNN_SEEDS, TF_CONFIGS if tf else CNN_CONFIGS,
                              key.endswith("_train"))
        return sides[key]

    def check_cnn_forward(out):
        check("cnn_forward_logits", rel(out, io["ksm.cnn.logits"]))

    def check_cnn8_forward(out):
        check("cnn8_forward_logits", rel(out, io["ksm.cnn8.logits"]))

    def check_cnn_eval(out):
        check("cnn_eval_logits", rel(side("cnn").fused_logits().view(kc, -1, 10),
                                     io["ksm.cnn.eval_logits"]))
        check("cnn_eval_loss", rel(torch.tensor(out[0]), io["ksm.cnn.eval_loss"].double()))
        acc_check("cnn_eval_acc", out[1], io["ksm.cnn.eval_acc"])

    def check_cnn_seq(out):
        check("cnn_eval_seq_loss", rel(torch.tensor(out[0]), io["ksm.cnn.eval_loss"].double()))
        acc_check("cnn_eval_seq_acc", out[1], io["ksm.cnn.eval_acc"])

    def check_tf_forward(out):
        check("tf_forward_logits_row0", rel(out[0], io["ksm.tf.logits0"]))

    def check_tf_eval(out):
        check("tf_eval_loss", rel(torch.tensor(out[0]), io["ksm.tf.eval_loss"].double()))
        acc_check("tf_eval_acc", out[1], io["ksm.tf.eval_acc"])

    def check_tf_seq(out):
        check("tf_eval_seq_loss", rel(torch.tensor(out[0]), io["ksm.tf.eval_loss"].double()))
        acc_check("tf_eval_seq_acc", out[1], io["ksm.tf.eval_acc"])

    # name -> (call, items, unit, check of the warm-up call's output)
    rows = {
        "cnn_forward": (lambda: side("cnn").forward(), cx.shape[0], "img/s", check_cnn_forward),
        "cnn8_forward": (lambda: side("cnn8").forward(), cx.shape[0], "img/s",
                         check_cnn8_forward),
        "cnn_eval_k8": (lambda: side("cnn").eval_fused(), kc * cx.shape[0], "rows/s",
                        check_cnn_eval),
        "cnn_eval_k8_seq": (lambda: side("cnn").eval_seq(), kc * cx.shape[0], "rows/s",
                            check_cnn_seq),
        "tf_forward": (lambda: side("tf").forward(), tx.numel(), "tok/s", check_tf_forward),
        "tf_eval_k2": (lambda: side("tf").eval_fused(), kt * tx.numel(), "tok/s", check_tf_eval),
        "tf_eval_k2_seq": (lambda: side("tf").eval_seq(), kt * tx.numel(), "tok/s",
                           check_tf_seq),
        "cnn_train": (lambda: side("cnn_train").train_step(), cx.shape[0], "img/s", None),
        "tf_train": (lambda: side("tf_train").train_step(), tx.numel(), "tok/s", None),
    }
    print("info torch=%s threads=%d device=%s openblas_core=%s esper=%s"
          % (torch.__version__, torch.get_num_threads(), DEV, openblas_core(), es.ESPER_COMMIT))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("quit"):
            break
        if line.startswith("mem"):
            print("ok mem", flush=True)
            continue
        name, reps = line.split()
        reps = int(reps)
        if name not in rows:
            print("skip %s" % name, flush=True)
            continue
        fn, items, unit, chk = rows[name]
        if reps == 0:
            if name.endswith("_train"):
                for k in range(2):
                    loss, correct, total = fn()
                    print("loss name=%s step=%d loss=%.9g correct=%d total=%d"
                          % (name, k, loss, correct, total), flush=True)
            else:
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
