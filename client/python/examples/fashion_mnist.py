#!/usr/bin/python3
"""Train esper's CNN host on Fashion-MNIST entirely through kasminad, growing one seed through
its whole lifecycle on the way.

Everything that touches the model is an RPC: CreateModel, ConfigureTraining (the learning-rate
schedule), TrainStep (every batch), Evaluate (validation with the counterfactual configurations,
and the test set), RecordMetrics (what the gates read), StepEpoch (the alpha ramp), Germinate,
AdvanceStage (the gates G1, G2, G3, G5) and Prune. This script holds only the data and the
decisions, like esper's trainer with its heuristic controller (esper.tamiyo.heuristic):

    host epochs -> Germinate a seed -> TRAINING (straight-through: the host's output is unchanged,
    the seed learns from the host's loss) -> G2 on the gradient statistics that TrainStep
    collected -> BLENDING (alpha ramps 0 -> 1 over --blend-tempo epochs) -> G3 -> HOLDING ->
    G5 on the measured counterfactual contribution -> FOSSILIZED.

An "epoch" is --steps-per-epoch TrainSteps (esper's max_batches; 0 = one pass over the training
split): each ends with an Evaluate of the validation split under esper's standard counterfactual
configurations (main, and each blending seed switched off / alone), an Evaluate of the test set,
one RecordMetrics per live seed, one StepEpoch and the controller's decisions.

    PYTHONPATH=build/client/python /usr/bin/python3 client/python/examples/fashion_mnist.py \\
        --spawn build/kasminad --json fmnist.json --plot fmnist.png

Needs Debian's dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist),
python3-numpy, python3-grpcio, python3-protobuf, and python3-matplotlib only for --plot. The
exit status is 0 on success, 1 on a usage or connection error, and 3 when a --require-* check
fails.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

try:
    from kasmina_client import Client, KasminaError, stage_name
except ImportError as e:  # the stubs live in the build tree
    sys.exit(f"fashion_mnist.py: {e}\n(put build/client/python on PYTHONPATH)")

DATA_DIR = "/usr/share/datasets/fashion-mnist"
LIVE = ("GERMINATED", "TRAINING", "BLENDING", "HOLDING", "FOSSILIZED")
COLLECTING = ("TRAINING", "BLENDING")  # TrainStep measures gradient statistics for these


# ---------------------------------------------------------------------------------------------
# Data: IDX files -> uint8 arrays; batches -> [B, 3, 32, 32] float32 (zero-padded, normalised,
# the grey channel repeated, since esper's CNN host takes three channels).

def load_idx(path):
    """An IDX file (gzipped or not) as a numpy array: uint8 images [N, 28, 28] or labels [N]."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: {data.size} bytes of data for dimensions {dims}")
    return data.reshape(dims)


class FashionMNIST:
    """The four IDX files; the last val_size training images are held out for validation (the
    gates and the counterfactual read them), the test set is only reported."""

    def __init__(self, root, val_size, train_limit=0, test_limit=0):
        def part(name):
            return load_idx(os.path.join(root, name))
        try:
            x, y = part("train-images-idx3-ubyte"), part("train-labels-idx1-ubyte")
            self.test_x = part("t10k-images-idx3-ubyte")
            self.test_y = part("t10k-labels-idx1-ubyte")
        except FileNotFoundError as e:
            raise SystemExit(f"fashion_mnist.py: {e.filename}: no such file; install Debian's "
                             f"dataset-fashion-mnist or pass --data DIR") from None
        if not 0 < val_size < len(x):
            raise SystemExit(f"fashion_mnist.py: --val-size must be in 1..{len(x) - 1}")
        self.train_x, self.train_y = x[:-val_size], y[:-val_size]
        self.val_x, self.val_y = x[-val_size:], y[-val_size:]
        if train_limit:
            self.train_x, self.train_y = self.train_x[:train_limit], self.train_y[:train_limit]
        if test_limit:
            self.test_x, self.test_y = self.test_x[:test_limit], self.test_y[:test_limit]
        # Statistics of the padded 32x32 training images (the padding is part of the input).
        n = self.train_x.shape[0] * 32 * 32
        s = self.train_x.sum(dtype=np.float64) / 255.0
        ss = np.square(self.train_x, dtype=np.float64).sum() / 255.0 ** 2
        self.mean = s / n
        self.std = math.sqrt(ss / n - self.mean ** 2)

    def inputs(self, images):
        """uint8 [B, 28, 28] -> float32 [B, 3, 32, 32]."""
        x = np.zeros((images.shape[0], 32, 32), np.float32)
        x[:, 2:30, 2:30] = images
        x *= np.float32(1.0 / 255.0)
        x -= np.float32(self.mean)
        x *= np.float32(1.0 / self.std)
        return np.ascontiguousarray(np.broadcast_to(x[:, None], (x.shape[0], 3, 32, 32)))

    def batches(self, batch_size, rng):
        """Endless shuffled passes over the training split: (inputs, int64 labels)."""
        n = self.train_x.shape[0]
        while True:
            order = rng.permutation(n)
            for i in range(0, n - batch_size + 1, batch_size):  # full batches only
                idx = order[i:i + batch_size]
                yield self.inputs(self.train_x[idx]), self.train_y[idx].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# A plain-text progress bar on stderr (only on a terminal).

class Progress:
    def __init__(self, enabled):
        self.enabled = enabled
        self.width = 0

    def update(self, label, done, total, info):
        if not self.enabled:
            return
        n = 24
        filled = n * done // max(total, 1)
        line = f"\r{label} [{'#' * filled}{'.' * (n - filled)}] {done}/{total} {info}"
        self.width = max(self.width, len(line))
        sys.stderr.write(line.ljust(self.width))
        sys.stderr.flush()

    def clear(self):
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


# ---------------------------------------------------------------------------------------------
# The controller: esper's HeuristicTamiyo, simplified. It reads the daemon's slot reports and
# returns actions; the daemon's gates decide whether an advance happens.

class Heuristic:
    """- germinate into the first empty slot once the host has trained min_epochs epochs and
         its validation accuracy has plateaued (gain < 0.5 points for plateau_epochs epochs;
         esper's SignalTracker), or at germinate_by at the latest (so that a fixed-length run
         always sees a seed), until max_seeds seeds are fossilized, never within embargo epochs
         of a prune;
       - GERMINATED: advance (G1) at once; TRAINING: advance (G2) every epoch; BLENDING: advance
         (G3) once the ramp rests at full amplitude; the gates decide;
       - TRAINING or BLENDING for prune_after epochs with accuracy down more than prune_drop
         points since the stage began: prune;
       - HOLDING: prune a "ransomware" seed (contribution > 0.1 but total improvement < 0);
         fossilize (G5) when the counterfactual contribution exceeds min_contribution, else
         prune."""

    def __init__(self, blueprints, min_epochs=3, plateau_epochs=2, germinate_by=5, max_seeds=1,
                 prune_after=5, prune_drop=2.0, min_contribution=0.5, embargo=5):
        self.blueprints = list(blueprints)
        self.min_epochs, self.plateau_epochs = min_epochs, plateau_epochs
        self.germinate_by = germinate_by
        self.max_seeds, self.prune_after, self.prune_drop = max_seeds, prune_after, prune_drop
        self.min_contribution, self.embargo = min_contribution, embargo
        self.best = -1.0
        self.plateau = 0
        self.germinated = 0
        self.last_prune = -100

    def observe(self, val_acc):
        """esper's plateau counter: epochs in a row that gained less than 0.5 points."""
        self.plateau = self.plateau + 1 if val_acc - self.best < 0.5 else 0
        self.best = max(self.best, val_acc)

    def decide(self, epoch, reports):
        actions = []
        live = [r for r in reports if r.occupied and stage_name(r.stage) in LIVE[:4]]
        for r in live:
            stage, m = stage_name(r.stage), r.metrics
            failing = (m.epochs_in_current_stage >= self.prune_after and
                       m.improvement_since_stage_start < -self.prune_drop)
            if stage in ("TRAINING", "BLENDING") and failing:
                actions.append(("prune", r.slot_id, f"failing_in_{stage.lower()}"))
            elif stage in ("GERMINATED", "TRAINING"):
                actions.append(("advance", r.slot_id, None))
            elif stage == "BLENDING":
                c = r.controller
                if (c.alpha_target >= 1 - 1e-6 and c.mode == 0 and  # HOLD at full amplitude
                        abs(c.alpha - c.alpha_target) <= 1e-6):
                    actions.append(("advance", r.slot_id, None))
            elif stage == "HOLDING":
                if not m.HasField("counterfactual_contribution"):
                    continue  # wait for a measurement
                cf = m.counterfactual_contribution
                if cf > 0.1 and m.total_improvement < 0:
                    actions.append(("prune", r.slot_id, "ransomware"))
                elif cf > self.min_contribution:
                    actions.append(("fossilize", r.slot_id, None))
                else:
                    actions.append(("prune", r.slot_id, "no_contribution"))
        if live:
            return actions  # esper: one live seed at a time
        empty = [r.slot_id for r in reports if not r.occupied]
        fossils = sum(1 for r in reports if r.occupied and stage_name(r.stage) == "FOSSILIZED")
        ready = epoch >= self.min_epochs and (self.plateau >= self.plateau_epochs or
                                              epoch >= self.germinate_by)
        if (empty and ready and fossils < self.max_seeds and
                epoch - self.last_prune >= self.embargo):
            bp = self.blueprints[self.germinated % len(self.blueprints)]
            self.germinated += 1
            actions.append(("germinate", empty[0], bp))
        return actions


# ---------------------------------------------------------------------------------------------
# Talking to kasminad

def spawn_daemon(binary, workdir):
    """kasminad on a private Unix socket, CPU only, no state on disk; (process, address)."""
    sock = os.path.join(workdir, "kasminad.sock")
    log = open(os.path.join(workdir, "kasminad.log"), "w")
    proc = subprocess.Popen([binary, "--listen", "unix:" + sock, "--no-cuda", "--no-persist",
                             "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(400):
        if os.path.exists(sock) or proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None or not os.path.exists(sock):
        proc.kill()
        proc.wait()
        log.close()
        with open(log.name) as f:
            raise SystemExit(f"fashion_mnist.py: {binary} did not start:\n{f.read()}")
    return proc, "unix:" + sock


def evaluate(c, model, x_u8, y, data, chunk, standard):
    """Evaluate over a whole split in chunks: {config name: (loss, accuracy %)}. standard: esper's
    counterfactual set (main, solo:<slot>, solo_on:<slot>, ...), else main alone."""
    sums = {}
    for i in range(0, len(y), chunk):
        r = c.evaluate(model, data.inputs(x_u8[i:i + chunk]), y[i:i + chunk].astype(np.int64),
                       configs=None if standard else {"main": {}}, generate_standard=standard)
        for res in r.results:
            s = sums.setdefault(res.name, [0.0, 0, 0])
            s[0] += res.loss * res.total
            s[1] += res.correct
            s[2] += res.total
    return {k: (s[0] / s[2], 100.0 * s[1] / s[2]) for k, s in sums.items()}


def gate_text(g):
    checks = g.checks_passed if g.passed else g.checks_failed
    return f"G{g.gate} {'passed' if g.passed else 'failed'}: {', '.join(checks)}"


def lr_at(epoch, epochs, lr, final_frac=0.02):
    """Cosine decay from lr (epoch 1) to lr * final_frac (the last epoch)."""
    t = (epoch - 1) / max(epochs - 1, 1)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def act(c, model, args, ctl, epoch, reports, action):
    """Carry out one of the controller's actions; the daemon's gates have the last word. Returns
    (the transitions that happened, a note on a gate that said no)."""
    kind, slot, arg = action
    before = stage_name(next(r.stage for r in reports if r.slot_id == slot))
    moves = []
    if kind == "prune":
        c.prune(model, slot, reason=arg, initiator="fashion_mnist")
        ctl.last_prune = epoch
        return [dict(epoch=epoch, slot=slot, frm=before, to="PRUNED", what=arg)], None
    if kind == "germinate":
        rep = c.germinate(model, slot, arg, blend_algorithm_id=args.blend,
                          blend_tempo_epochs=args.blend_tempo,
                          init_seed=args.init_seed + 1000 + ctl.germinated)
        moves.append(dict(epoch=epoch, slot=slot, frm="DORMANT", to="GERMINATED",
                          what=f"germinate {arg}, seed {rep.seed_id}"))
        before = "GERMINATED"
        gate, rep = c.advance_stage(model, slot)  # G1 at once (esper: at the next decision)
    else:  # advance (G2, G3) or fossilize (G5)
        gate, rep = c.advance_stage(model, slot, "fossilized" if kind == "fossilize" else None)
    after = stage_name(rep.stage)
    if gate.passed and after != before:
        moves.append(dict(epoch=epoch, slot=slot, frm=before, to=after, what=gate_text(gate)))
    return moves, None if gate.passed else f"{slot} {gate_text(gate)}"


# ---------------------------------------------------------------------------------------------
# The run

def run(args, c, log):
    t_start = time.time()
    data = FashionMNIST(args.data, args.val_size, args.train_limit, args.test_limit)
    steps_per_epoch = args.steps_per_epoch or data.train_x.shape[0] // args.batch_size
    slots = args.slots.split(",")
    model = args.model_id
    if args.replace and any(m.model_id == model for m in c.list_models()):
        c.delete_model(model)
    # esper's CNNHost, every field given (a 0 would mean "default", and the daemon would say so)
    cnn = {"num_classes": 10, "base_channels": args.base_channels, "n_blocks": 3,
           "kernel_size": 3, "in_channels": 3}
    c.create_model(model, cnn=cnn,
                   slots=slots, device=args.device, init_seed=args.init_seed,
                   permissive_gates=args.permissive_gates)
    info = c.get_model(model)
    # The stride is 0: the last TrainStep of each epoch asks for the statistics explicitly, so
    # that RecordMetrics(use_collected_gradients) folds the epoch's final gradients (esper).
    c.configure_training(model, host={"lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4},
                         seed={"lr": args.seed_lr, "momentum": 0.9, "weight_decay": 0.0},
                         max_grad_norm=args.max_grad_norm, gradient_telemetry_stride=0)
    ctl = Heuristic(args.blueprints.split(","), min_epochs=args.germinate_after,
                    germinate_by=args.germinate_by, max_seeds=args.max_seeds)
    log(f"model {model}: CNN host base {args.base_channels} ({info.device}), slots "
        f"{','.join(slots)}, {'permissive' if args.permissive_gates else 'strict'} gates; "
        f"train {data.train_x.shape[0]}, val {data.val_x.shape[0]}, test {data.test_x.shape[0]} "
        f"images; {args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size}")

    rng = np.random.default_rng(args.data_seed)
    batches = data.batches(args.batch_size, rng)
    progress = Progress(args.progress)
    history, transitions = [], []
    last_notes = set()
    total_steps = 0
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        lr = lr_at(epoch, args.epochs, args.lr)
        seed_lr = lr_at(epoch, args.epochs, args.seed_lr)
        c.configure_training(model, host={"lr": lr}, seed={"lr": seed_lr})

        # ---- train: TrainStep per batch; the last one collects gradient statistics ----
        loss_sum, correct, seen, last = 0.0, 0, 0, None
        n = steps_per_epoch
        if args.limit_steps:
            n = min(n, args.limit_steps - total_steps)
        for k in range(n):
            x, y = next(batches)
            r = c.train_step(model, x, y, collect_gradients=(k == n - 1))
            loss_sum += r.loss * r.total
            correct += r.correct
            seen += r.total
            last = r
            progress.update(f"epoch {epoch}", k + 1, n,
                            f"loss {loss_sum / seen:.4f} acc {100 * correct / seen:.1f}%")
        total_steps += n
        train_loss, train_acc = loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)
        grads = {s.slot_id: s for s in last.seeds} if last and last.gradients_collected else {}

        # ---- evaluate: validation with the counterfactual configs, then the test set ----
        t_eval = time.time()
        progress.update(f"epoch {epoch}", n, n, "evaluating validation and test sets")
        val = evaluate(c, model, data.val_x, data.val_y, data, args.eval_chunk, standard=True)
        test = evaluate(c, model, data.test_x, data.test_y, data, args.eval_chunk, standard=False)
        val_loss, val_acc = val["main"]
        test_loss, test_acc = test["main"]
        eval_secs = time.time() - t_eval
        progress.clear()
        contributions = {name[5:]: val_acc - acc for name, (_, acc) in val.items()
                         if name.startswith("solo:")}

        # ---- report to the daemon: what the gates read ----
        for rep in c.slot_reports(model):
            if not rep.occupied or stage_name(rep.stage) not in LIVE:
                continue  # empty or cooling down
            kw = {}
            if rep.slot_id in contributions:
                kw["counterfactual_contribution"] = contributions[rep.slot_id]
            c.record_metrics(model, rep.slot_id, val_accuracy=val_acc, epoch=epoch,
                             max_epochs=args.epochs,
                             use_collected_gradients=rep.slot_id in grads, **kw)
        c.step_epoch(model)  # the alpha ramp (BLENDING) and the cooldown pipeline

        # ---- decide ----
        ctl.observe(val_acc)
        reports = c.slot_reports(model)
        notes = []
        for action in ctl.decide(epoch, reports):
            moves, note = act(c, model, args, ctl, epoch, reports, action)
            for t in moves:
                transitions.append(t)
                log(f"  epoch {epoch}: {t['slot']} {t['frm']} -> {t['to']} ({t['what']})")
            if note:
                notes.append(note)

        # ---- the epoch's line ----
        reports = c.slot_reports(model)
        slot_rows = []
        for rep in reports:
            st = stage_name(rep.stage) if rep.occupied else "empty"
            row = dict(slot=rep.slot_id, stage=st, alpha=rep.controller.alpha,
                       seed_id=rep.seed_id, blueprint=rep.blueprint_id)
            if rep.slot_id in contributions:
                row["contribution"] = contributions[rep.slot_id]
            if rep.slot_id in grads:
                row["grad_ratio"] = grads[rep.slot_id].normalized_ratio
                row["grad_health"] = grads[rep.slot_id].gradient_health
            if rep.occupied and rep.metrics.HasField("seed_gradient_norm_ratio"):
                row["grad_ratio_ema"] = rep.metrics.seed_gradient_norm_ratio
            slot_rows.append(row)
        secs = time.time() - t0
        rec = dict(epoch=epoch, steps=total_steps, lr=lr, train_loss=train_loss,
                   train_acc=train_acc, val_loss=val_loss, val_acc=val_acc, test_loss=test_loss,
                   test_acc=test_acc, counterfactual={k: v[1] for k, v in val.items()},
                   slots=slot_rows, gates_failed=notes, seconds=secs,
                   train_seconds=t_eval - t0, eval_seconds=eval_secs)
        history.append(rec)
        slot_text = "  ".join(
            f"{s['slot']} {s['stage']} a={s['alpha']:.2f}" +
            (f" cf={s['contribution']:+.2f}" if "contribution" in s else "")
            for s in slot_rows)
        log(f"epoch {epoch:3d}/{args.epochs}  loss {train_loss:.4f}  train {train_acc:5.2f}%  "
            f"val {val_acc:5.2f}%  test {test_acc:5.2f}%  lr {lr:.4f}  {slot_text}  "
            f"({secs:.0f} s)")
        for note in notes:
            if note not in last_notes:  # say why a gate holds a seed back, once per reason
                log(f"             {note}")
        last_notes = set(notes)
        if args.json:  # rewritten every epoch: a long run can be watched
            write_json(args.json, args, history, transitions, None, t_start)
        if args.limit_steps and total_steps >= args.limit_steps:
            break

    events = [dict(sequence=e.sequence, type=e.event_type, slot=e.slot_id, seed_id=e.seed_id,
                   from_stage=stage_name(e.from_stage), to_stage=stage_name(e.to_stage),
                   alpha=e.alpha)
              for e in c.watch_events(model, timeout=1.0)
              if e.event_type != "SEED_GATE_EVALUATED"]
    final = dict(test_acc=history[-1]["test_acc"], test_loss=history[-1]["test_loss"],
                 val_acc=history[-1]["val_acc"], steps=total_steps,
                 wall_s=time.time() - t_start,
                 stages={s["slot"]: s["stage"] for s in history[-1]["slots"]}, events=events)
    log(f"done: test accuracy {final['test_acc']:.2f}% after {total_steps} steps "
        f"({final['wall_s'] / 60:.1f} min); " +
        ", ".join(f"{k} {v}" for k, v in final["stages"].items()))
    if args.json:
        write_json(args.json, args, history, transitions, final, t_start)
    if not args.keep_model:
        c.delete_model(model)
    return history, transitions, final


def write_json(path, args, history, transitions, final, t_start):
    doc = dict(command=" ".join(sys.argv), args=vars(args),
               machine=dict(cpu=cpu_name(), cores=os.cpu_count(), python=platform.python_version()),
               started_unix=t_start, epochs=history, transitions=transitions, final=final)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# The plot

def plot_title(base, final, cpu):
    return (f"Fashion-MNIST through kasminad: CNN host base {base}, test {final['test_acc']:.2f}% "
            f"({final['steps']} steps, {final['wall_s'] / 60:.0f} min, {cpu})")


def plot(path, history, transitions, title):
    """Three panels over the epochs: losses; accuracies; each seed's alpha and its counterfactual
    contribution. Dotted lines mark the lifecycle transitions."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fashion_mnist.py: --plot needs python3-matplotlib; no plot written", file=sys.stderr)
        return False
    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True,
                                        gridspec_kw={"height_ratios": [1, 1.5, 0.8]})
    for key, label, color in (("train", "train", "tab:blue"), ("val", "validation", "tab:orange"),
                              ("test", "test", "tab:green")):
        ax1.plot(ep, [h[key + "_loss"] for h in history], label=label, color=color)
        ax2.plot(ep, [h[key + "_acc"] for h in history], label=label, color=color,
                 lw=2 if key == "test" else 1.2)
    ax1.set_ylabel("cross-entropy")
    ax1.legend(loc="center right", bbox_to_anchor=(1, 0.4), fontsize=8)
    ax1.set_title(title, fontsize=10)
    ax2.set_ylabel("accuracy (%)")
    tail = history[len(history) // 4:]
    ax2.set_ylim(max(min(min(h["test_acc"], h["train_acc"]) for h in tail) - 2, 0),
                 min(max(max(h["test_acc"], h["train_acc"]) for h in tail) + 1.5, 100))
    ax2.legend(loc="lower right", fontsize=8)
    for slot in [s["slot"] for s in history[0]["slots"]]:
        rows = [(h["epoch"], next(s for s in h["slots"] if s["slot"] == slot)) for h in history]
        if not any(r["alpha"] for _, r in rows):
            continue
        ax3.step([e for e, _ in rows], [r["alpha"] for _, r in rows], where="post",
                 color="tab:purple", label=f"alpha {slot}")
        cf = [(e, r["contribution"]) for e, r in rows if "contribution" in r]
        if cf:
            ax4 = ax3.twinx()
            ax4.plot(*zip(*cf), "o-", color="tab:red", ms=3, lw=1,
                     label=f"contribution {slot}")
            ax4.set_ylabel("contribution (points)", color="tab:red", fontsize=8)
            ax3.plot([], [], "o-", color="tab:red", ms=3, lw=1, label=f"contribution {slot}")
    ax3.set_ylim(-0.05, 1.1)
    ax3.set_ylabel("alpha", color="tab:purple")
    ax3.set_xlabel("epoch")
    if ax3.get_legend_handles_labels()[0]:
        ax3.legend(loc="upper left", fontsize=8)
    marks = {}
    for t in transitions:
        marks.setdefault(t["epoch"], []).append(f"{t['to']}")
    for e, names in marks.items():
        for ax in (ax1, ax2, ax3):
            ax.axvline(e, color="grey", lw=0.8, ls=":")
        ax1.annotate(" / ".join(dict.fromkeys(names)), (e, 1), xycoords=("data", "axes fraction"),
                     xytext=(2, -4), textcoords="offset points", rotation=90, fontsize=7,
                     va="top", color="dimgrey")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("daemon")
    g.add_argument("--address", help="kasminad's address (unix:/path or host:port; default "
                   "$KASMINA_ADDR or the daemon's default socket)")
    g.add_argument("--socket", help="kasminad's Unix socket path (same as --address unix:PATH)")
    g.add_argument("--spawn", metavar="KASMINAD", help="start this kasminad binary on a private "
                   "socket (CPU only, no state on disk) and stop it at the end")
    g.add_argument("--model-id", default="fashion-mnist")
    g.add_argument("--replace", action="store_true", help="delete a model of the same id first")
    g.add_argument("--keep-model", action="store_true", help="leave the model on the daemon")
    g.add_argument("--device", default="", help="the model's device (default: the daemon's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=DATA_DIR, help="directory of the four IDX files")
    g.add_argument("--val-size", type=int, default=5000,
                   help="training images held out for validation (the gates read it)")
    g.add_argument("--train-limit", type=int, default=0, help="use only this many training "
                   "images (0 = all)")
    g.add_argument("--test-limit", type=int, default=0, help="use only this many test images")
    g.add_argument("--data-seed", type=int, default=1, help="shuffling seed")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--steps-per-epoch", type=int, default=120, help="TrainSteps per epoch "
                   "(esper's max_batches; 0 = one pass over the training split)")
    g.add_argument("--limit-steps", type=int, default=0, help="stop after this many TrainSteps")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--base-channels", type=int, default=32)
    g.add_argument("--lr", type=float, default=0.05, help="host learning rate at epoch 1 "
                   "(cosine decay to 2%% of it)")
    g.add_argument("--seed-lr", type=float, default=0.05, help="seed learning rate at epoch 1")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--init-seed", type=int, default=1, help="model and seed initialisation")
    g.add_argument("--eval-chunk", type=int, default=500, help="rows per Evaluate call")
    g = p.add_argument_group("seeds")
    g.add_argument("--slots", default="r1c1", help="registered slots (comma-separated)")
    g.add_argument("--blueprints", default="conv_light",
                   help="blueprint rotation (comma-separated)")
    g.add_argument("--max-seeds", type=int, default=1, help="stop germinating once this many "
                   "seeds are fossilized")
    g.add_argument("--germinate-after", type=int, default=3,
                   help="earliest epoch of a germination")
    g.add_argument("--germinate-by", type=int, default=5,
                   help="germinate at this epoch even without a plateau")
    g.add_argument("--blend", default="linear", choices=("linear", "sigmoid", "gated"))
    g.add_argument("--blend-tempo", type=int, default=8, help="epochs of the alpha ramp")
    g.add_argument("--permissive-gates", action="store_true",
                   help="esper's permissive gates (default: strict)")
    g = p.add_argument_group("output")
    g.add_argument("--json", help="write the per-epoch metrics and transitions here")
    g.add_argument("--plot", help="write the curves here (PNG; needs python3-matplotlib)")
    g.add_argument("--replot", metavar="JSON", help="only draw --plot from a saved --json run")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it is drawn only when stderr is a terminal)")
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    g.add_argument("--require-fossilized", action="store_true",
                   help="exit 3 unless a seed reached FOSSILIZED")
    g.add_argument("--require-accuracy", type=float, default=0.0,
                   help="exit 3 if the final test accuracy is below this (%%)")
    args = p.parse_args(argv)
    args.progress = args.progress and sys.stderr.isatty()
    if args.socket:
        args.address = "unix:" + args.socket
    for name in ("epochs", "batch_size", "base_channels", "eval_chunk", "blend_tempo"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.replot:
        with open(args.replot) as f:
            doc = json.load(f)
        final, a = doc["final"], doc["args"]
        return 0 if plot(args.plot or "fashion_mnist.png", doc["epochs"], doc["transitions"],
                         plot_title(a["base_channels"], final, doc["machine"]["cpu"])) else 1
    workdir = proc = None
    try:
        address = args.address
        if args.spawn:
            workdir = tempfile.mkdtemp(prefix="fmnist-")
            proc, address = spawn_daemon(args.spawn, workdir)
        with Client(address, timeout=600, wait_for_ready=bool(args.spawn)) as c:
            history, transitions, final = run(args, c, log)
    except KasminaError as e:
        print(f"fashion_mnist.py: {e}", file=sys.stderr)
        if workdir:  # what the spawned daemon said, before its directory goes
            with open(os.path.join(workdir, "kasminad.log")) as f:
                sys.stderr.write("".join(f.readlines()[-20:]))
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.plot:
        if plot(args.plot, history, transitions,
                plot_title(args.base_channels, final, cpu_name())):
            log(f"plot: {args.plot}")
    status = 0
    if args.require_fossilized and "FOSSILIZED" not in final["stages"].values():
        print("fashion_mnist.py: no seed reached FOSSILIZED", file=sys.stderr)
        status = 3
    if final["test_acc"] < args.require_accuracy:
        print(f"fashion_mnist.py: test accuracy {final['test_acc']:.2f}% is below "
              f"{args.require_accuracy}%", file=sys.stderr)
        status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
