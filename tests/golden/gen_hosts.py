#!/usr/bin/python3
"""PyTorch golden fixtures for the host networks (tests/unit/test_host.c).

Regenerate (needs Debian's python3-torch; CI does not, it reads the committed files):

    cd <repo> && /usr/bin/python3 tests/golden/gen_hosts.py

The output is deterministic (fixed seed, 2 threads); re-running it must leave git clean.

The two hosts are written here from the specification (docs/models.md#cnnhost, docs/models.md) with
esper's module names, independently of the C code, in eval mode:

    hosts_cnn.safetensors  CNNHost base_channels 8, n_blocks 3, kernel 3, 10 classes.
        The full state_dict ("host.blocks.0.conv.weight", ... incl. num_batches_tracked),
        every weight and every BatchNorm running statistic randomised. Inputs "x16"
        [2,3,16,16] and "x12" [3,3,12,12]; logits "logits.x16.p3", "logits.x16.p1",
        "logits.x12.p3", "logits.x12.p1" (pool_layers 3 and 1: pool_layers leaves no trace in
        the weights); features at every injection point of x16 with pool_layers 3,
        "feat.x16.p3.r0c0" ... "feat.x16.p3.r1c2".
    hosts_tf.safetensors   TransformerHost V=97, D=48, n_head 6, n_layer 3, block_size 32,
        num_segments 3. The state_dict with both tied names (identical bytes), every weight
        randomised (LayerNorm affine too). Inputs "t7" [2,7] and "t32" [2,32] I64; logits
        "logits.t7", "logits.t32"; features after every segment of t7, "feat.t7.r0c0" ...

Metadata records the configurations ("cnn", "tf").
"""
import json
import math
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))

torch.manual_seed(20250301)
torch.set_num_threads(2)

DT = {torch.float32: "F32", torch.int64: "I64"}


def write(name, tensors, meta):
    header = {}
    blobs = []
    off = 0
    for tname, t in tensors:
        t = t.detach().contiguous()
        a = t.numpy()
        b = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[tname] = {"dtype": DT[t.dtype], "shape": list(t.shape),
                         "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = meta
    hj = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    print("%-24s %3d tensors %8d bytes" % (name, len(tensors), 8 + len(hj) + off))


# ---- CNNHost (docs/models.md#cnnhost) ----

class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CNNHost(nn.Module):
    def __init__(self, num_classes=10, n_blocks=3, base_channels=32, pool_layers=None,
                 kernel_size=3, in_channels=3):
        super().__init__()
        self.n_blocks = n_blocks
        self.pool_layers = n_blocks if pool_layers is None else pool_layers
        self.blocks = nn.ModuleList()
        cin = in_channels
        for i in range(n_blocks):
            c = base_channels * 2 ** i
            self.blocks.append(ConvBlock(cin, c, kernel_size))
            cin = c
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(cin, num_classes)

    def features(self, x):
        """Features at every injection point, keyed by slot id."""
        out = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            out["r0c%d" % i] = x
            if i < self.pool_layers:
                x = self.pool(x)
                out["r1c%d" % i] = x
        return x, out

    def forward(self, x):
        x, _ = self.features(x)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cnn_fixture():
    host = CNNHost(num_classes=10, n_blocks=3, base_channels=8, kernel_size=3)
    with torch.no_grad():
        for blk in host.blocks:
            c = blk.bn.num_features
            blk.conv.weight.normal_(0, 1.0 / math.sqrt(blk.conv.weight[0].numel()))
            blk.bn.weight.uniform_(0.5, 1.5)
            blk.bn.bias.normal_(0, 0.2)
            blk.bn.running_mean.normal_(0, 0.3)
            blk.bn.running_var.uniform_(0.4, 2.0)
            assert blk.bn.running_mean.shape == (c,)
        host.classifier.weight.normal_(0, 0.3)
        host.classifier.bias.normal_(0, 0.3)
    host.eval()
    tensors = [("host." + k, v) for k, v in host.state_dict().items()]
    x16 = torch.randn(2, 3, 16, 16)
    x12 = torch.randn(3, 3, 12, 12)
    tensors += [("x16", x16), ("x12", x12)]
    with torch.no_grad():
        for xname, x in (("x16", x16), ("x12", x12)):
            for p in (3, 1):
                host.pool_layers = p
                tensors.append(("logits.%s.p%d" % (xname, p), host(x)))
        host.pool_layers = 3
        _, feats = host.features(x16)
        for sid, f in feats.items():
            tensors.append(("feat.x16.p3." + sid, f))
    write("hosts_cnn.safetensors", tensors,
          {"cnn": "num_classes=10 n_blocks=3 base_channels=8 kernel_size=3 in_channels=3"})


# ---- TransformerHost (docs/models.md) ----

class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, hd).transpose(1, 2) for z in (q, k, v))
        # torch 1.13 has no F.scaled_dot_product_attention: the math formula, causal
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, d)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class TransformerHost(nn.Module):
    def __init__(self, vocab_size, n_embd, n_head, n_layer, block_size, num_segments):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.layers = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.per = n_layer // num_segments

    def features(self, x):
        t = x.shape[1]
        h = self.tok_emb(x) + self.pos_emb(torch.arange(t))
        out = {}
        for l, blk in enumerate(self.layers):
            h = blk(h)
            if (l + 1) % self.per == 0:
                out["r0c%d" % ((l + 1) // self.per - 1)] = h
        return h, out

    def forward(self, x):
        h, _ = self.features(x)
        return self.head(self.ln_f(h))


def tf_fixture():
    host = TransformerHost(97, 48, 6, 3, 32, 3)
    with torch.no_grad():
        for name, p in host.named_parameters():
            if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "ln_f.weight":
                p.uniform_(0.6, 1.4)
            elif "ln" in name:
                p.normal_(0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "emb" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    host.eval()
    sd = host.state_dict()
    assert sd["head.weight"].data_ptr() == sd["tok_emb.weight"].data_ptr()
    tensors = [("host." + k, v) for k, v in sd.items()]
    t7 = torch.randint(0, 97, (2, 7), dtype=torch.int64)
    t32 = torch.randint(0, 97, (2, 32), dtype=torch.int64)
    tensors += [("t7", t7), ("t32", t32)]
    with torch.no_grad():
        tensors.append(("logits.t7", host(t7)))
        tensors.append(("logits.t32", host(t32)))
        _, feats = host.features(t7)
        for sid, f in feats.items():
            tensors.append(("feat.t7." + sid, f))
    write("hosts_tf.safetensors", tensors,
          {"tf": "vocab_size=97 n_embd=48 n_head=6 n_layer=3 block_size=32 num_segments=3"})


if __name__ == "__main__":
    cnn_fixture()
    tf_fixture()
