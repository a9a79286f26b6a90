#!/usr/bin/python3
"""PyTorch reference for bench_gemm: torch.matmul on float32, same sizes, same output format.

Run with Debian's /usr/bin/python3 (python3-torch). Threads = cores unless TORCH_THREADS is set.
"""
import os
import statistics
import sys
import time

import torch

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
sizes = [int(x) for x in sys.argv[2:]] or [256, 512, 1024, 2048]
torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count())))
g = torch.Generator().manual_seed(1)
for n in sizes:
    a = torch.rand(n, n, generator=g) * 2 - 1
    b = torch.rand(n, n, generator=g) * 2 - 1
    c = torch.empty(n, n)
    torch.matmul(a, b, out=c)
    t0 = time.perf_counter()
    torch.matmul(a, b, out=c)
    one = time.perf_counter() - t0
    inner = 1 if one > 0.05 else int(0.05 / max(one, 1e-6)) + 1
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        ms.append((time.perf_counter() - t0) * 1e3 / inner)
    med = statistics.median(ms)
    print(f"gemm n={n} median_ms={med:.3f} gflops={2.0 * n ** 3 / (med * 1e-3) / 1e9:.1f}", flush=True)
