#!/usr/bin/python3
"""PyTorch reference for bench_ops: the same ops and shapes, eager mode, each op synchronous.

Run with Debian's /usr/bin/python3 (python3-torch). Threads = cores unless TORCH_THREADS is set.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count())))
torch.manual_seed(0)
r = torch.randn


def bench(name, fn):
    with torch.no_grad():
        fn()
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        inner = 1 if one > 0.02 else int(0.02 / max(one, 1e-7)) + 1
        ms = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            ms.append((time.perf_counter() - t0) * 1e3 / inner)
    print(f"op name={name} median_ms={statistics.median(ms):.4f}", flush=True)


x = r(32, 32, 32, 32)
w3, wd = r(32, 32, 3, 3), r(32, 1, 3, 3)
c = [r(32) for _ in range(4)]
c[1] = c[1].abs() + 2
bench("conv3x3_b32_c32_32x32", lambda: F.conv2d(x, w3, None, 1, 1))
bench("depthwise3x3_b32_c32_32x32", lambda: F.conv2d(x, wd, None, 1, 1, 1, 32))
bench("batchnorm_b32_c32_32x32", lambda: F.batch_norm(x, c[0], c[1], c[2], c[3], False, 0.1, 1e-5))
bench("groupnorm_g2_b32_c32_32x32", lambda: F.group_norm(x, 2, c[0], c[1], 1e-5))
bench("relu_b32_c32_32x32", lambda: F.relu(x))
bench("maxpool2_b32_c32_32x32", lambda: F.max_pool2d(x, 2, 2))
xb, wa = r(32, 32, 32, 32), torch.rand(32, 1, 1, 1)
bench("lerp_per_sample_b32_c32_32x32", lambda: torch.lerp(x, xb, wa))

h = r(8, 256, 384)
lw, lb = r(384), r(384)
bench("layernorm_8x256_d384", lambda: F.layer_norm(h, (384,), lw, lb, 1e-5))
fw, fb = r(1536, 384), r(1536)
bench("linear_8x256_384to1536", lambda: F.linear(h, fw, fb))
hf = r(8, 256, 1536)
bench("gelu_8x256x1536", lambda: F.gelu(hf))
q, k, v = r(8, 6, 256, 64), r(8, 6, 256, 64), r(8, 6, 256, 64)
bench("sdpa_causal_8x6x256x64", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
      if hasattr(F, "scaled_dot_product_attention") else
      torch.softmax((q @ k.transpose(-1, -2) / 8.0).masked_fill(
          torch.ones(256, 256, dtype=torch.bool).triu(1), float("-inf")), -1) @ v)
s = r(8, 6, 256, 256)
bench("softmax_8x6x256x256", lambda: torch.softmax(s, -1))
emb = r(50257, 384)
ids = torch.arange(8 * 256).reshape(8, 256) % 50257
bench("embedding_8x256_v50257_d384", lambda: F.embedding(ids, emb))
