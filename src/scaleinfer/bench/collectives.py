"""The cost of one tensor-parallel all-reduce on this machine: shared memory vs gloo, by vector size.

    python -m scaleinfer.bench.collectives [--ranks 2] [--sizes 576,1536] [--iters 2000] [--json out.json]

Spawns `--ranks` local processes (1 thread each) joined by gloo on 127.0.0.1, warms up, then times
`--iters` back-to-back all-reduces of each size with each communicator (distributed/communicators.py);
reports the median over 5 rounds of the mean time per all-reduce, as rank 0 sees it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time

ROUNDS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, sizes: list[int], kinds: list[str], iters: int, queue) -> None:
    import torch

    from scaleinfer.distributed.communicators import make_communicator
    from scaleinfer.distributed.parallel_state import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    state = init_distributed(f"tcp://127.0.0.1:{port}", rank, world, world, 1, 60.0)
    results = {}
    for kind in kinds:
        comm = make_communicator(state, kind, 60.0)
        for n in sizes:
            x = torch.randn(n)
            for _ in range(min(iters, 200)):
                comm.all_reduce_(x)
            rounds = []
            for _ in range(ROUNDS):
                start = time.perf_counter()
                for _ in range(iters):
                    comm.all_reduce_(x)
                rounds.append((time.perf_counter() - start) / iters)
            results[f"{kind}/{n}"] = statistics.median(rounds) * 1e6
        comm.close()
    destroy_distributed()
    queue.put((rank, results))


def measure(world: int, sizes: list[int], kinds: list[str], iters: int) -> dict[str, float]:
    """Microseconds per all-reduce, by "kind/size", as rank 0 measured."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, sizes, kinds, iters, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(timeout=30)
    return results[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--sizes", default="576,1536", help="float32 elements per all-reduce, comma-separated")
    p.add_argument("--kinds", default="shm,gloo")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    res = measure(args.ranks, sizes, kinds, args.iters)
    print(f"all-reduce, {args.ranks} ranks x 1 thread, median of {ROUNDS} rounds of {args.iters}:")
    print(f"{'floats':>8} " + " ".join(f"{k + ' us':>10}" for k in kinds))
    for n in sizes:
        print(f"{n:>8} " + " ".join(f"{res[f'{k}/{n}']:>10.1f}" for k in kinds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": args.ranks, "iters": args.iters, "us_per_all_reduce": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
