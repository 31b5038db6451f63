"""Batch-1 paged decode attention alone (kernels/csrc: paged_decode_attention), per KV dtype and context.

    python benchmarks/decode_attention.py --contexts 4096 --kv float32,float16,bfloat16,int8 --threads 2

One "token" is one call per layer over `--layers` separate caches (SmolLM2-135M's shape by default: 30
layers, 9 query heads, 3 KV heads, head_dim 64, 16-slot blocks laid out in a shuffled block table as the
engine's paged cache is), so the KV of a token is read from memory as in a real decode step. Reports ms
per token (wall, and the process's CPU time: on a loaded machine the CPU time of a 1-thread run is the
steadier measure), the KV bytes a token reads (data + int8 scales) and the GB/s that makes. `--baseline PATH`
loads another build of the kernel module (e.g. a copy of an older `_C*.so`) and times it in the same run,
interleaved, for a same-run ratio on a shared machine; `--prefetch-ab` instead times this build with
SI_ATTN_PREFETCH=0 (no prefetch of the next block's K and V lines during a block's passes) as the baseline;
`--isa avx2` runs a lower ISA level's path (the AVX2 path on an AVX-512 CPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from scaleinfer.attention.kv_int8 import Int8KV
from scaleinfer.attention.sdpa import kernel_kv_args
from scaleinfer.kernels.huge_pages import advise_huge_pages
from scaleinfer.kernels.loader import cpu_kernels


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer_caches(kind: str, slots: int, hkv: int, d: int, layers: int, huge_pages: bool):
    """Per layer the kernel's K/V arguments, the caches allocated as kv_cache/cache_tensors.py does."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(layers):
        k, v = torch.randn(slots, hkv, d, generator=g), torch.randn(slots, hkv, d, generator=g)
        if kind == "int8":
            kc, vc = Int8KV.empty(slots, hkv, d, channel_scale=torch.rand(hkv, d, generator=g) + 0.5), \
                Int8KV.empty(slots, hkv, d)
            for t in (kc.data, vc.data):
                huge_pages and advise_huge_pages(t)
            every = torch.arange(slots)
            kc.write(every, k)
            vc.write(every, v)
            out.append(kernel_kv_args(kc, vc))
        else:
            kc, vc = (torch.empty(slots, hkv, d, dtype=getattr(torch, kind)) for _ in range(2))
            for t in (kc, vc):
                huge_pages and advise_huge_pages(t)
            kc.copy_(k)
            vc.copy_(v)
            out.append((kc, vc, None, None, None, None))
    return out


def _kv_bytes(kv, context: int) -> int:
    k, v, ks, vs = kv[:4]
    per_slot = (k[0].numel() * k.element_size()) * 2
    if ks is not None:
        per_slot += ks[0].numel() * 4 * 2
    return per_slot * context


def _time_token(ops, caches, q, slots, lens, scale, out) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one token's calls."""
    start, cpu = time.perf_counter(), time.process_time()
    for kv in caches:
        ops.paged_decode_attention(out, q, kv[0], kv[1], slots, lens, scale, *kv[2:])
    return time.perf_counter() - start, time.process_time() - cpu


def _worker(a) -> None:
    """One kernel module (this tree's, or `--module`'s) in its own process (pybind registers a module's
    classes once per process): prepares the caches of one (context, kv), answers `round` with seconds."""
    torch.set_num_threads(a.threads)
    ops = _load_module(a.module) if a.module else cpu_kernels()
    if a.isa:
        if a.isa not in ops.isas():
            raise SystemExit(f"this CPU has no {a.isa} (it has {', '.join(ops.isas())})")
        ops.set_isa(a.isa)
    context, kind, block = a.contexts_one, a.kv, 16
    num_blocks = (context + block - 1) // block
    table = torch.randperm(num_blocks + 8, generator=torch.Generator().manual_seed(1))[:num_blocks]
    slots = (table.unsqueeze(-1) * block + torch.arange(block)).view(1, -1)[:, :context].contiguous()
    lens = torch.tensor([context])
    q = torch.randn(1, a.heads, a.head_dim)
    out = torch.empty(1, a.heads, a.head_dim)
    caches = _layer_caches(kind, (num_blocks + 8) * block, a.kv_heads, a.head_dim, a.layers, not a.no_huge_pages)
    args = (ops, caches, q, slots, lens, a.head_dim ** -0.5, out)
    _time_token(*args)
    print(json.dumps({"bytes": _kv_bytes(caches[0], context) * a.layers}), flush=True)
    for line in sys.stdin:
        n = int(line)
        wall, cpu = zip(*[_time_token(*args) for _ in range(n)])
        print(json.dumps({"s": statistics.median(wall), "cpu": statistics.median(cpu)}), flush=True)


class _Proc:
    def __init__(self, a, context: int, kind: str, module: str | None, env: dict | None = None):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--context-one", str(context), "--kv", kind]
        cmd += ["--isa", a.isa] if a.isa else []
        cmd += ["--threads", str(a.threads), "--layers", str(a.layers), "--heads", str(a.heads),
                "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim)]
        cmd += ["--module", module] if module else []
        cmd += ["--no-huge-pages"] if a.no_huge_pages else []
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **(env or {})})
        self.bytes = json.loads(self.p.stdout.readline())["bytes"]
        self.times: list[float] = []
        self.cpu: list[float] = []

    def round(self, n: int) -> None:
        self.p.stdin.write(f"{n}\n")
        self.p.stdin.flush()
        res = json.loads(self.p.stdout.readline())
        self.times.append(res["s"])
        self.cpu.append(res["cpu"])

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def run(a) -> list[dict]:
    rows = []
    for context in [int(c) for c in a.contexts.split(",")]:
        for kind in a.kv.split(","):
            procs = {"new": _Proc(a, context, kind, None)}
            if a.baseline:
                procs["baseline"] = _Proc(a, context, kind, a.baseline)
            elif a.prefetch_ab:
                procs["baseline"] = _Proc(a, context, kind, None, {"SI_ATTN_PREFETCH": "0"})
            for r in range(a.rounds):
                for p in (list(procs.values()) if r % 2 == 0 else list(procs.values())[::-1]):
                    p.round(5)
            for p in procs.values():
                p.close()
            nbytes = procs["new"].bytes
            row = {"context": context, "kv": kind, "kv_mb_per_token": nbytes / 1e6}
            for name, p in procs.items():
                t = statistics.median(p.times)
                row[f"{name}_ms"] = t * 1e3
                row[f"{name}_gb_s"] = nbytes / t / 1e9
                row[f"{name}_cpu_ms"] = statistics.median(p.cpu) * 1e3
            if "baseline" in procs:
                row["speedup"] = statistics.median(b / n for b, n in zip(procs["baseline"].times, procs["new"].times))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    s = (f"context {r['context']:6d}  kv {r['kv']:9s}  {r['kv_mb_per_token']:6.1f} MB/token  "
         f"new {r['new_ms']:7.2f} ms ({r['new_gb_s']:5.1f} GB/s, cpu {r['new_cpu_ms']:6.2f} ms)")
    if "baseline_ms" in r:
        s += (f"  baseline {r['baseline_ms']:7.2f} ms ({r['baseline_gb_s']:5.1f} GB/s, cpu {r['baseline_cpu_ms']:6.2f} ms)"
              f"  speedup {r['speedup']:.2f}x")
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4096")
    p.add_argument("--kv", default="float32,float16,bfloat16,int8")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (each the median of 5 tokens)")
    p.add_argument("--baseline", default=None, help="path of another build of the kernel module to compare")
    p.add_argument("--prefetch-ab", action="store_true", help="baseline: this build with SI_ATTN_PREFETCH=0")
    p.add_argument("--isa", default=None, help="run the kernels at this ISA level (e.g. avx2 on an AVX-512 CPU)")
    p.add_argument("--no-huge-pages", action="store_true", help="caches on 4 KiB pages (no MADV_HUGEPAGE)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--context-one", dest="contexts_one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--module", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a)
        return 0
    rows = run(a)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(a), "load_average": os.getloadavg(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
