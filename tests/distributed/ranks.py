"""Run a function on N local ranks joined by gloo on 127.0.0.1 (spawned processes, bounded waits), for the
distributed tests: each rank's return value comes back, a rank's exception fails the test with its text."""
from __future__ import annotations

import multiprocessing as mp
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, tp: int, queue, args) -> None:
    import torch

    from scaleinfer.distributed.parallel_state import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    try:
        state = init_distributed(f"tcp://127.0.0.1:{port}", rank, world, tp, world // tp, 30.0)
        queue.put((rank, True, fn(state, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_ranks(fn, world: int, *args, tp: int | None = None, timeout: float = 120.0) -> list:
    """fn(state, *args) on `world` ranks (tensor-parallel groups of `tp`, default all); results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, tp or world, queue, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
