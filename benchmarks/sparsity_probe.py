"""Does unstructured sparsity pay on this CPU with torch? CSR matmul vs dense at SmolLM2's FFN down_proj shape,
m=1 (decode) and m=128 (prefill), one thread. (2:4 semi-structured sparsity has no CPU kernel in torch.)"""
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(1)
w = torch.randn(576, 1536)
def bench(fn, x, n=200):
    for _ in range(10): fn(x)
    t = time.perf_counter()
    for _ in range(n): fn(x)
    return (time.perf_counter() - t) / n * 1e6
for m in (1, 128):
    x = torch.randn(m, 1536)
    dense = bench(lambda x: x @ w.t(), x)
    row = [f"m={m}: dense {dense:.0f} us"]
    for sp in (0.5, 0.9):
        ws = w * (torch.rand_like(w) > sp)
        csr = ws.to_sparse_csr()
        t = bench(lambda x: (csr @ x.t()).t(), x)
        row.append(f"csr {int(sp*100)}% {t:.0f} us ({dense / t:.2f}x)")
    print(", ".join(row))
