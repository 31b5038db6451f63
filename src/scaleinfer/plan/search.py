"""Every tp x pp x dp layout of a cluster, estimated, and the recommendation.

Objective (stated in the report): the highest decode throughput (tokens/s over all replicas) at the
largest batch whose time per output token stays within the latency bound (--max-tpot-ms); ties go to
the lower TPOT, then to fewer pipeline stages. When no layout meets the bound even at batch 1, the one
with the lowest batch-1 latency is recommended and the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from scaleinfer.errors import ConfigError
from scaleinfer.plan.cost import Estimate, Layout, Workload, estimate
from scaleinfer.plan.devices import Cluster
from scaleinfer.plan.shapes import ModelShape


@dataclass
class Plan:
    shape: ModelShape
    cluster: Cluster
    work: Workload
    estimates: list[Estimate]
    best: Estimate | None
    meets_bound: bool
    """Whether `best` is within the latency bound (False: the fallback, lowest latency)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(count: int, tp: int | None = None, pp: int | None = None, dp: int | None = None) -> list[Layout]:
    """Every (tp, pp, dp) with tp x pp x dp == count that agrees with the sizes given."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if value is not None and (value < 1 or count % value):
            raise ConfigError(f"--{name} {value} does not divide the {count} devices; pick a divisor of {count}")
    found = [Layout(t, p, count // (t * p)) for t in _divisors(count) for p in _divisors(count // t)]
    found = [lay for lay in found if (tp is None or lay.tp == tp) and (pp is None or lay.pp == pp)
             and (dp is None or lay.dp == dp)]
    if not found:
        raise ConfigError(f"no layout has tp={tp} pp={pp} dp={dp} on {count} devices (tp x pp x dp must be {count})")
    return found


def within(est: Estimate, work: Workload) -> bool:
    return work.max_tpot is None or est.tpot <= work.max_tpot


def plan(shape: ModelShape, cluster: Cluster, work: Workload, tp: int | None = None, pp: int | None = None,
         dp: int | None = None) -> Plan:
    estimates = [estimate(shape, cluster, lay, work) for lay in layouts(cluster.count, tp, pp, dp)]
    fitting = [e for e in estimates if e.fits]
    bounded = [e for e in fitting if within(e, work)]
    if bounded:
        best = max(bounded, key=lambda e: (e.decode_tokens_s, -e.tpot, -e.layout.pp))
    elif fitting:
        best = min(fitting, key=lambda e: (e.latency_b1, e.layout.pp))
    else:
        best = None
    estimates.sort(key=lambda e: (not e.fits, -e.decode_tokens_s))
    return Plan(shape, cluster, work, estimates, best, bool(bounded))
