"""The router's replicas: their URLs, whether each is in rotation, what each has outstanding, and the
health checks that take a replica out of rotation and let it back in.

A replica leaves rotation at once when its process (one this router started) has exited, when a
connection to it is refused or breaks, or after HEALTH_FAILURES health checks in a row that time out or
answer other than 200; it rejoins when /health answers 200 again. Leaving rotation sets the replica's
`down` event, which wakes the requests in flight on it (proxy.py ends or retries them), so nothing
waits on a dead replica past one health interval.
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
from dataclasses import dataclass, field

import httpx

from scaleinfer.serving.router.metrics import RouterMetrics
from scaleinfer.serving.router.policies import Policy, ReplicaLoad

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
"""Seconds a replica has to answer one /health."""
HEALTH_FAILURES = 3
"""Health checks in a row that time out or fail before a replica leaves rotation (a refused connection
or an exited process take it out at once)."""


@dataclass(eq=False)
class Replica:
    load: ReplicaLoad
    url: str
    proc: subprocess.Popen | None = None
    """The replica's process when this router started it (serve --data-parallel-size)."""
    healthy: bool = False
    reason: str = "not checked yet"
    """Why it is out of rotation (for logs and 503 messages)."""
    failures: int = 0
    down: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while out of rotation; requests in flight on it wait on the event they started with."""

    @property
    def name(self) -> str:
        return self.load.name


class ReplicaSet:
    def __init__(self, urls: list[str], metrics: RouterMetrics, policy: Policy, client: httpx.AsyncClient,
                 procs: list[subprocess.Popen] | None = None, auth: dict[str, str] | None = None):
        self.replicas = [Replica(ReplicaLoad(i, f"r{i}"), url.rstrip("/"), procs[i] if procs else None)
                         for i, url in enumerate(urls)]
        for r in self.replicas:
            r.down.set()
        self.metrics, self.policy, self.client = metrics, policy, client
        self.auth = auth or {}
        """Headers the router sends to replicas (their internal API key), if any."""
        for r in self.replicas:
            metrics.replica_info(r.name, r.url)
            metrics.set_up(r.name, False)

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def describe_down(self) -> str:
        return "; ".join(f"{r.name}: {r.reason}" for r in self.replicas if not r.healthy)

    # ---- load ------------------------------------------------------------------------------
    def begin(self, replica: Replica, tokens: int) -> None:
        replica.load.outstanding_requests += 1
        replica.load.outstanding_tokens += tokens
        self.metrics.set_load(replica.load)

    def end(self, replica: Replica, tokens: int) -> None:
        replica.load.outstanding_requests -= 1
        replica.load.outstanding_tokens -= tokens
        self.metrics.set_load(replica.load)

    # ---- rotation ----------------------------------------------------------------------------
    def mark_down(self, replica: Replica, reason: str) -> None:
        replica.reason = reason
        if not replica.healthy:
            return
        replica.healthy = False
        replica.down.set()
        self.policy.forget(replica.name)
        self.metrics.set_up(replica.name, False)
        logger.warning("replica %s (%s) is out of rotation: %s", replica.name, replica.url, reason)

    def mark_up(self, replica: Replica) -> None:
        replica.failures = 0
        if replica.healthy:
            return
        replica.healthy, replica.reason = True, ""
        replica.down = asyncio.Event()
        self.metrics.set_up(replica.name, True)
        logger.info("replica %s (%s) is in rotation", replica.name, replica.url)

    # ---- health ------------------------------------------------------------------------------
    async def check(self, replica: Replica) -> None:
        if replica.proc is not None and replica.proc.poll() is not None:
            return self.mark_down(replica, f"its process exited with code {replica.proc.returncode}")
        try:
            r = await self.client.get(replica.url + "/health", headers=self.auth, timeout=HEALTH_TIMEOUT_S)
        except httpx.ConnectError as exc:
            return self.mark_down(replica, f"connection refused ({exc})" if str(exc) else "connection refused")
        except httpx.TransportError as exc:
            return self._failed(replica, f"/health failed: {type(exc).__name__} {exc}".strip())
        if r.status_code == 200:
            return self.mark_up(replica)
        self._failed(replica, f"/health answered {r.status_code}")

    def _failed(self, replica: Replica, reason: str) -> None:
        replica.failures += 1
        if replica.failures >= HEALTH_FAILURES or not replica.healthy:
            self.mark_down(replica, f"{reason} ({replica.failures} checks in a row)")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def health_loop(self, interval_s: float) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must outlive any one check
                logger.exception("health check failed")
            await asyncio.sleep(interval_s)
