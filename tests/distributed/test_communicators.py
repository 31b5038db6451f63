"""The tensor-parallel collectives (distributed/communicators.py) on 2-3 local ranks: the shared-memory
all-reduce equals the sum and is identical on every rank, gather puts the shards side by side on rank 0,
broadcast delivers rank 0's ints, for shm and gloo alike; sizes beyond one shared slot go in rounds."""
from __future__ import annotations

import pytest
import torch

from scaleinfer.kernels import cpu_kernels
from tests.distributed.ranks import run_ranks

needs_shm = pytest.mark.skipif(cpu_kernels() is None or not hasattr(cpu_kernels(), "ShmComm"),
                               reason="C++ kernels not built")


def _exercise(state, kind: str):
    from scaleinfer.distributed.communicators import SHM_SLOT_BYTES, make_communicator

    comm = make_communicator(state, kind, 30.0)
    out = {"name": comm.name}
    g = torch.Generator().manual_seed(1234)
    inputs = [torch.randn(n, generator=g) for n in (576, 1536, 3 * 896)]
    big = SHM_SLOT_BYTES // 4 + 1000                                  # two rounds through the slots
    inputs.append(torch.arange(big, dtype=torch.float32) * 1e-3)
    sums = []
    for x in inputs:
        mine = x * (state.rank + 1)
        sums.append(comm.all_reduce_(mine.clone()))
    out["sums"] = sums
    shard = torch.full((3, 5), float(state.rank)) + torch.arange(5.0)
    out["gather"] = comm.gather_last(shard)
    msg = torch.arange(10, dtype=torch.long) * 7 if comm.rank == 0 else None
    out["bcast"] = comm.broadcast_ints(msg)
    out["bcast_empty"] = comm.broadcast_ints(torch.empty(0, dtype=torch.long) if comm.rank == 0 else None, True)
    out["stats"] = comm.stats()
    comm.reset_stats()
    out["stats_reset"] = comm.stats()
    comm.close()
    return out


def _check(results, world: int):
    g = torch.Generator().manual_seed(1234)
    factor = sum(range(1, world + 1))
    for r, res in enumerate(results):
        for got, n in zip(res["sums"], (576, 1536, 3 * 896)):
            expected = torch.randn(n, generator=g) * factor if r == 0 else None
            if r == 0:
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
        assert torch.equal(res["sums"][3], results[0]["sums"][3])
        assert res["bcast"].tolist() == [7 * i for i in range(10)]
        assert res["bcast_empty"].numel() == 0
        g = torch.Generator().manual_seed(1234)
    for r in range(1, world):   # every rank holds the same bits
        for a, b in zip(results[0]["sums"], results[r]["sums"]):
            assert torch.equal(a, b)
    expected = torch.cat([torch.full((3, 5), float(r)) + torch.arange(5.0) for r in range(world)], dim=-1)
    assert torch.equal(results[0]["gather"], expected)
    assert all(res["gather"] is None for res in results[1:])
    for res in results:   # 4 all-reduces and a gather counted (broadcasts too on shm's rank 0), then reset
        seconds, calls = res["stats"]
        assert calls >= 5 and seconds > 0
        assert tuple(res["stats_reset"]) == (0.0, 0)
    big = results[0]["sums"][3]
    torch.testing.assert_close(big, torch.arange(big.numel(), dtype=torch.float32) * 1e-3 * factor)


@needs_shm
def test_shm_collectives_two_ranks():
    results = run_ranks(_exercise, 2, "shm")
    assert results[0]["name"] == "shm"
    _check(results, 2)


@needs_shm
def test_shm_collectives_three_ranks():
    _check(run_ranks(_exercise, 3, "shm"), 3)


def test_gloo_collectives_two_ranks():
    results = run_ranks(_exercise, 2, "gloo")
    assert results[0]["name"] == "gloo"
    _check(results, 2)
