"""esper-lite's own code on Debian's torch 1.13, for the benchmarks' PyTorch side.

    ESPER_SRC=/path/to/esper-lite /usr/bin/python3 tests/bench/torch_model.py DIR

ESPER_SRC is a checkout of tachyon-beep/esper-lite at commit 2016337e (the project machine has
one at /work/esper-lite). This module makes that checkout importable on Debian's python3-torch
(1.13) with as few shims as its import chain needs, and builds esper's own MorphogeneticModel
(CNNHost / TransformerHost, SeedSlot, blueprints) for the bench configurations from the weights
kasmina exported. The benchmark rows then call esper's code itself: `model(x)`,
`model.fused_forward` through `process_fused_val_batch` (simic/training/counterfactual_eval.py),
`process_val_batch` with `SeedSlot.force_alpha` for sequential configurations and
`process_train_batch` (simic/training/batch_ops.py) with the optimizers esper's trainer makes.

Shims (installed once by install(); each one is what torch 2's API does, in torch 1.13 terms):
  - torch.compiler.disable: an identity decorator (esper marks telemetry helpers and the
    flex-attention mask cache "not for dynamo"; there is no dynamo here).
  - F.scaled_dot_product_attention: the reference math of its documentation,
    softmax(q kᵀ · scale + causal mask / attn_mask) v, dropout on the weights when dropout_p > 0.
  - torch.nn.attention.flex_attention: create_block_mask records the mask_mod; flex_attention
    evaluates it densely over broadcast index tensors and runs the same math.
  - nn.Module._apply(fn, recurse=True): torch 1.13's takes no `recurse`; esper's
    FlexAttentionSeed._apply passes it to super().
What is not shimmed is imported from the checkout as it is. The training step is loaded without
esper's RL stack (tamiyo, simic's package __init__s, the vectorized trainer and its data
loaders): batch_ops.py, counterfactual_eval.py and simic/telemetry/gradient_collector.py are
loaded by file path under stub parent packages (see _load_training), and loss_and_correct, a
13-line function of simic/training/vectorized.py (whose module imports the whole trainer), is
compiled from that file's own source text.
"""
import ast
import importlib.util
import json
import math
import os
import struct
import sys
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ESPER_COMMIT = "2016337e"
_installed = False
_src = None


def esper_src():
    """The esper-lite checkout (ESPER_SRC), or SystemExit with how to get one."""
    src = os.environ.get("ESPER_SRC")
    hint = ("the PyTorch side of the benchmarks runs esper-lite's own code: set ESPER_SRC to a "
            "checkout of tachyon-beep/esper-lite at commit %s, e.g.\n"
            "  git clone https://github.com/tachyon-beep/esper-lite && "
            "git -C esper-lite checkout %s\n"
            "  export ESPER_SRC=$PWD/esper-lite\n"
            "(on the project machine: ESPER_SRC=/work/esper-lite)" % (ESPER_COMMIT, ESPER_COMMIT))
    if not src:
        raise SystemExit("ESPER_SRC is not set: " + hint)
    pkg = os.path.join(src, "src", "esper", "kasmina", "host.py")
    if not os.path.isfile(pkg):
        raise SystemExit("ESPER_SRC=%s has no src/esper/kasmina/host.py: %s" % (src, hint))
    return src


# ---------------------------------------------------------------------------------------------
# torch 2 API shims
# ---------------------------------------------------------------------------------------------

def _compiler_disable(fn=None, recursive=True):
    """torch.compiler.disable: usable bare (@disable) or called (@disable(recursive=False))."""
    if fn is None:
        return lambda f: f
    return fn


_causal_masks = {}


def _causal_mask(L, S, device):
    """True above the diagonal (the positions a causal query may not see; top-left aligned, as
    torch 2's reference `ones(L, S).tril(diagonal=0)`), cached per shape."""
    key = (L, S, str(device))
    m = _causal_masks.get(key)
    if m is None:
        m = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
        _causal_masks[key] = m
    return m


def _attend(q, k, v, scores, dropout_p):
    w = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        w = F.dropout(w, p=dropout_p, training=True)
    return torch.matmul(w, v)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """torch 2's F.scaled_dot_product_attention, as its documented reference implementation."""
    if enable_gqa:
        raise NotImplementedError("esper_shims: enable_gqa is not shimmed (esper does not use it)")
    s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        scores = scores.masked_fill(_causal_mask(query.size(-2), key.size(-2), query.device),
                                    float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return _attend(query, key, value, scores, dropout_p)


class BlockMask:
    """What create_block_mask returns, densely: the mask_mod and the sizes it was made for."""

    def __init__(self, mask_mod, B, H, Q_LEN, KV_LEN, device):
        self.mask_mod, self.B, self.H = mask_mod, B, H
        self.Q_LEN, self.KV_LEN, self.device = Q_LEN, KV_LEN, device
        self._dense = {}

    def dense(self, B, H, device):
        """mask_mod(b, h, q_idx, kv_idx) over broadcast index tensors -> bool [B|1, H|1, Q, KV].
        (torch 2 vmaps the mask_mod over scalars; an elementwise mask_mod gives the same values
        on broadcast tensors.)"""
        key = (B, H, str(device))
        m = self._dense.get(key)
        if m is None:
            b = torch.arange(B, device=device).view(-1, 1, 1, 1)
            h = torch.arange(H, device=device).view(1, -1, 1, 1)
            qi = torch.arange(self.Q_LEN, device=device).view(1, 1, -1, 1)
            ki = torch.arange(self.KV_LEN, device=device).view(1, 1, 1, -1)
            m = torch.as_tensor(self.mask_mod(b, h, qi, ki), device=device).to(torch.bool)
            self._dense[key] = m
        return m


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cuda", BLOCK_SIZE=128,
                      _compile=False):
    return BlockMask(mask_mod, B, H, Q_LEN, KV_LEN, device)


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                   enable_gqa=False, return_lse=False, kernel_options=None):
    """torch 2's flex_attention evaluated densely: scores, score_mod, the block mask's mask_mod,
    softmax, weighted sum of the values."""
    if enable_gqa or return_lse:
        raise NotImplementedError("esper_shims: enable_gqa / return_lse are not shimmed")
    Bq, Hq, L, _ = query.shape
    s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * s
    if score_mod is not None:
        b = torch.arange(Bq, device=query.device).view(-1, 1, 1, 1)
        h = torch.arange(Hq, device=query.device).view(1, -1, 1, 1)
        qi = torch.arange(L, device=query.device).view(1, 1, -1, 1)
        ki = torch.arange(key.size(-2), device=query.device).view(1, 1, 1, -1)
        scores = score_mod(scores, b, h, qi, ki)
    if block_mask is not None:
        scores = scores.masked_fill(~block_mask.dense(Bq, Hq, query.device), float("-inf"))
    return _attend(query, key, value, scores, 0.0)


_module_apply_113 = nn.Module._apply


def _module_apply(self, fn, recurse=True):
    """nn.Module._apply with torch 2's `recurse` (False: this module's own tensors only)."""
    if recurse:
        return _module_apply_113(self, fn)
    children = self._modules
    self._modules = {}
    try:
        return _module_apply_113(self, fn)
    finally:
        self._modules = children


def install():
    """Installs the shims (only where torch lacks the API) and puts ESPER_SRC/src on sys.path.
    Idempotent; returns the checkout."""
    global _installed, _src
    if _installed:
        return _src
    _src = esper_src()
    if not hasattr(torch, "compiler"):
        m = types.ModuleType("torch.compiler")
        m.disable = _compiler_disable
        torch.compiler = m
        sys.modules["torch.compiler"] = m
    if not hasattr(F, "scaled_dot_product_attention"):
        F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError:
        att = sys.modules.get("torch.nn.attention") or types.ModuleType("torch.nn.attention")
        att.__path__ = []  # a package, so that the submodule import below resolves
        fa = types.ModuleType("torch.nn.attention.flex_attention")
        fa.create_block_mask, fa.flex_attention, fa.BlockMask = (create_block_mask,
                                                                 flex_attention, BlockMask)
        att.flex_attention = fa
        torch.nn.attention = att
        sys.modules["torch.nn.attention"] = att
        sys.modules["torch.nn.attention.flex_attention"] = fa
    if "recurse" not in _module_apply_113.__code__.co_varnames:
        nn.Module._apply = _module_apply
    sys.path.insert(0, os.path.join(_src, "src"))
    _installed = True
    return _src


# ---------------------------------------------------------------------------------------------
# esper's training / validation steps without the RL stack
# ---------------------------------------------------------------------------------------------

def _stub_package(name, path=None):
    """An empty package module (its real __init__ imports the RL stack)."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = [path] if path else []
        sys.modules[name] = mod
    return mod


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class ParallelEnvState(types.SimpleNamespace):
    """The fields of simic/training/parallel_env_state.py's ParallelEnvState that the steps
    read: model, host_optimizer, seed_optimizers, env_device, stream, scaler,
    autocast_enabled (the real class carries the RL environment's bookkeeping too)."""


_training = None


def training():
    """-> namespace: process_train_batch, process_val_batch, process_fused_val_batch,
    loss_and_correct, materialize_grad_stats, materialize_dual_grad_stats (esper's own)."""
    global _training
    if _training is not None:
        return _training
    src = install()
    pkg = os.path.join(src, "src", "esper")
    import esper.leyline  # noqa: F401  (real: the protocols and constants batch_ops imports)
    # esper.simic's and esper.simic.training's __init__ import the PPO agent and the trainer;
    # esper.simic.telemetry's only re-exports gradient_collector (lazily).
    _stub_package("esper.simic", os.path.join(pkg, "simic"))
    tr = _stub_package("esper.simic.training", os.path.join(pkg, "simic", "training"))
    tel = _stub_package("esper.simic.telemetry", os.path.join(pkg, "simic", "telemetry"))
    gc = _load_file("esper.simic.telemetry.gradient_collector",
                    os.path.join(pkg, "simic", "telemetry", "gradient_collector.py"))
    for n in ("collect_host_gradients_async", "collect_seed_gradients_async",
              "collect_seed_gradients_only_async", "materialize_grad_stats",
              "materialize_dual_grad_stats"):
        setattr(tel, n, getattr(gc, n))
    # batch_ops imports batch_obs_to_features (Tamiyo's observation features, used only by
    # batch_signals_to_features, not by the steps) and ParallelEnvState (annotations only).
    _stub_package("esper.tamiyo")
    _stub_package("esper.tamiyo.policy")
    feats = types.ModuleType("esper.tamiyo.policy.features")

    def batch_obs_to_features(*a, **k):
        raise NotImplementedError("esper_shims: Tamiyo's features are not loaded")

    feats.batch_obs_to_features = batch_obs_to_features
    sys.modules["esper.tamiyo.policy.features"] = feats
    pes = types.ModuleType("esper.simic.training.parallel_env_state")
    pes.ParallelEnvState = ParallelEnvState
    sys.modules["esper.simic.training.parallel_env_state"] = pes
    tr.parallel_env_state = pes
    bo = _load_file("esper.simic.training.batch_ops",
                    os.path.join(pkg, "simic", "training", "batch_ops.py"))
    cf = _load_file("esper.simic.training.counterfactual_eval",
                    os.path.join(pkg, "simic", "training", "counterfactual_eval.py"))
    # loss_and_correct: compiled from vectorized.py's source (the trainer passes it as
    # loss_and_correct_fn; `_compiled_loss_and_correct = loss_and_correct` there, eager).
    path = os.path.join(pkg, "simic", "training", "vectorized.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "loss_and_correct"]
    assert len(fn) == 1, "vectorized.py: loss_and_correct not found"
    ns = {"torch": torch, "nn": nn}
    exec(compile(ast.Module(body=fn, type_ignores=[]), path, "exec"), ns)
    _training = types.SimpleNamespace(
        process_train_batch=bo.process_train_batch, process_val_batch=bo.process_val_batch,
        process_fused_val_batch=cf.process_fused_val_batch,
        loss_and_correct=ns["loss_and_correct"],
        materialize_grad_stats=gc.materialize_grad_stats,
        materialize_dual_grad_stats=gc.materialize_dual_grad_stats)
    return _training


# ---------------------------------------------------------------------------------------------
# weights and models
# ---------------------------------------------------------------------------------------------

_NP = {"F32": "<f4", "I64": "<i8", "I32": "<i4", "F64": "<f8"}


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
        dt = np.dtype(_NP[d["dtype"]])
        a = np.frombuffer(data, dtype=dt, count=(e - b) // dt.itemsize, offset=b)
        out[name] = torch.from_numpy(a.reshape(d["shape"]).astype(dt.newbyteorder("="),
                                                                  copy=True))
    return out, meta


# The bench configurations: runtime/tasks.py's presets (that module imports the data loaders,
# which need torchvision, so the host constructions are repeated here, argument for argument).
#   cnn32        CNNHost defaults (base 32, 3 blocks): the configuration of issue 7's rows
#   cifar_base8  _cifar_baseline_spec: CNNHost(num_classes=10, base_channels=8)
#   tinystories  _tinystories_spec: TransformerHost(50257, 384, 6 heads, 6 layers, block 256,
#                dropout=DEFAULT_DROPOUT); the bench passes dropout 0 (see build_model)
CONFIGS = {
    "cnn32": ("cnn", "classification", dict(num_classes=10, n_blocks=3, base_channels=32)),
    "cifar_base8": ("cnn", "classification", dict(num_classes=10, base_channels=8)),
    "tinystories": ("transformer", "lm", dict(vocab_size=50257, n_embd=384, n_head=6, n_layer=6,
                                              block_size=256)),
}


# The stages in which a slot holds a seed module (the others: none, or freed by a prune).
SEED_MODULE_STAGES = ("GERMINATED", "TRAINING", "BLENDING", "HOLDING", "FOSSILIZED")


def build_model(config, weights, dropout=0.0, device="cpu"):
    """esper's MorphogeneticModel for CONFIGS[config], every slot of the exported file
    registered, its seeds germinated through esper's own MorphogeneticModel.germinate_seed
    (esper's blueprints), then esper's load_state_dict(strict=True) of the file: the weights
    and each slot's _extra_state (SeedSlot.set_extra_state: stage, alpha, alpha algorithm,
    isolate_gradients). CNN models are then converted to channels_last as esper's env factory
    does (simic/training/env_factory.py). `weights` is a path or (tensors, metadata).

    dropout: the transformer host's; esper's tinystories preset has DEFAULT_DROPOUT (0.1); the
    bench uses 0 so that the two sides' training steps are deterministic and comparable (in
    eval mode dropout does nothing either way)."""
    install()
    from esper.kasmina.host import CNNHost, MorphogeneticModel, TransformerHost
    from esper.leyline import AlphaAlgorithm, SeedStage

    topology, _, kw = CONFIGS[config]
    tensors, meta = read_safetensors(weights) if isinstance(weights, str) else weights
    pre, suf = "seed_slots.", "._extra_state"
    extra = {k[len(pre):-len(suf)]: json.loads(v) for k, v in meta.items()
             if k.startswith(pre) and k.endswith(suf)}
    if topology == "cnn":
        host = CNNHost(**kw)
    else:
        host = TransformerHost(dropout=dropout, **kw)
    order = [s.slot_id for s in host.injection_specs()]
    model = MorphogeneticModel(host, device=device, slots=[s for s in order if s in extra],
                               permissive_gates=True)
    sd = dict(tensors)
    for sid, ex in extra.items():
        st = ex["seed_state"]
        if st is not None and ex.get("alpha_schedule_config") is not None:
            raise SystemExit("esper_shims: gated blends are not benched")
        if st is not None and SeedStage(st["stage"]).name in SEED_MODULE_STAGES:
            model.germinate_seed(st["blueprint_id"], st["seed_id"], slot=sid,
                                 blend_algorithm_id=ex["blend_algorithm_id"],
                                 blend_tempo_epochs=ex["blend_tempo_epochs"],
                                 alpha_algorithm=AlphaAlgorithm(int(st["alpha_algorithm"])))
        sd[pre + sid + suf] = ex
    model.load_state_dict(sd, strict=True)
    if topology == "transformer":
        assert model.host.head.weight is model.host.tok_emb.weight
        assert torch.equal(tensors["host.head.weight"], tensors["host.tok_emb.weight"])
    else:
        model = model.to(memory_format=torch.channels_last)
    return model


def seed_slot_ids(model):
    return [s for s in model.seed_slots if model.seed_slots[s].seed is not None]


class Trainer:
    """One environment of esper's vectorized trainer, reduced to its training step:
    env_factory.py's host optimizer (SGD over get_host_parameters, lr task_spec.host_lr,
    momentum 0.9, weight decay 5e-4), batch_ops' per-slot seed optimizers (made by
    process_train_batch itself: SGD lr task_spec.seed_lr, momentum 0.9), criterion
    nn.CrossEntropyLoss(), max_grad_norm DEFAULT_TRAINING_MAX_GRAD_NORM, gradient telemetry
    every gradient_telemetry_stride (10) batches (TrainingConfig defaults: use_telemetry on,
    amp off), slots = every slot the model was made with. step() is one batch of
    vectorized_trainer.py's loop: process_train_batch, then the loss and correct count read
    back (.item(); the trainer does it after its stream sync)."""

    STRIDE = 10

    def __init__(self, model, task_type):
        from esper.leyline import DEFAULT_HOST_LR, DEFAULT_SEED_LR, DEFAULT_TRAINING_MAX_GRAD_NORM
        t = training()
        self.t = t
        self.model = model
        self.task_spec = types.SimpleNamespace(task_type=task_type, host_lr=DEFAULT_HOST_LR,
                                               seed_lr=DEFAULT_SEED_LR)
        self.max_grad_norm = DEFAULT_TRAINING_MAX_GRAD_NORM
        dev = str(next(model.parameters()).device)
        self.env = ParallelEnvState(
            model=model, env_device=dev, stream=None, scaler=None, autocast_enabled=False,
            seed_optimizers={},
            host_optimizer=torch.optim.SGD(model.get_host_parameters(), lr=DEFAULT_HOST_LR,
                                           momentum=0.9, weight_decay=5e-4))
        self.criterion = nn.CrossEntropyLoss()
        self.slots = list(model.seed_slots.keys())
        self.batch_step = 0
        self.grad_stats = None

    def step(self, x, y):
        """-> (loss, correct, total) of this batch (before the update)."""
        self.model.train()
        loss, correct, total, gs = self.t.process_train_batch(
            self.env, x, y, self.criterion, use_telemetry=self.batch_step % self.STRIDE == 0,
            slots=self.slots, max_grad_norm=self.max_grad_norm, task_spec=self.task_spec,
            resolved_amp_dtype=None, loss_and_correct_fn=self.t.loss_and_correct)
        if gs is not None:
            self.grad_stats = gs  # vectorized_trainer keeps the last batch's
        self.batch_step += 1
        return loss.item(), int(correct.item()), total
