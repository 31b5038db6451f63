"""The router's /metrics: its own counters (scaleinfer_router_*) and every replica's metrics, scraped at
each request of /metrics and merged family by family with a `replica` label (r0, r1, ...)."""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from scaleinfer.serving.metrics import CONTENT_TYPE, ROUTES

__all__ = ["CONTENT_TYPE", "RouterMetrics", "merge_replica_metrics"]

_NAME_END = re.compile(r"[{ ]")


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter("scaleinfer_router_http_requests", "HTTP requests the router answered, by "
                                     "route and status code.", ["route", "status"], registry=r)
        self.routed = Counter("scaleinfer_router_requests", "Requests sent to a replica (retries too), by replica "
                              "and the policy's reason.", ["replica", "reason"], registry=r)
        self.retries = Counter("scaleinfer_router_retries", "Requests that failed on a replica before any response "
                               "byte and were sent to another.", ["replica"], registry=r)
        self.stream_errors = Counter("scaleinfer_router_stream_errors", "Streams cut because their replica failed "
                                     "mid-stream (the client got an error event).", ["replica"], registry=r)
        self.unavailable = Counter("scaleinfer_router_unavailable", "Requests answered 503 because no replica "
                                   "could take them.", registry=r)
        self.up = Gauge("scaleinfer_router_replica_up", "1 while the replica is in rotation.", ["replica"],
                        registry=r)
        self.info = Gauge("scaleinfer_router_replica_info", "The replica's URL.", ["replica", "url"], registry=r)
        self.requests = Gauge("scaleinfer_router_outstanding_requests", "Requests sent to the replica and not yet "
                              "answered.", ["replica"], registry=r)
        self.tokens = Gauge("scaleinfer_router_outstanding_tokens", "Estimated tokens (prompt + max tokens) of "
                            "those requests.", ["replica"], registry=r)

    def record_http(self, path: str, status: int) -> None:
        """The Gate's hook (serving/guard.py)."""
        self.http_requests.labels(route=path if path in ROUTES else "other", status=str(status)).inc()

    def replica_info(self, name: str, url: str) -> None:
        self.info.labels(replica=name, url=url).set(1)

    def set_up(self, name: str, up: bool) -> None:
        self.up.labels(replica=name).set(1 if up else 0)

    def set_load(self, load) -> None:
        self.requests.labels(replica=load.name).set(load.outstanding_requests)
        self.tokens.labels(replica=load.name).set(load.outstanding_tokens)

    def render(self, replica_texts: dict[str, str]) -> bytes:
        return generate_latest(self.registry) + merge_replica_metrics(replica_texts).encode()


def _labelled(line: str, replica: str) -> str:
    """`name{a="b"} 1` -> `name{replica="r0",a="b"} 1`; `name 1` -> `name{replica="r0"} 1`."""
    m = _NAME_END.search(line)
    if m is None:
        return line
    cut = m.start()
    if line[cut] == "{":
        rest = line[cut + 1:]
        return f'{line[:cut]}{{replica="{replica}"{"," if not rest.startswith("}") else ""}{rest}'
    return f'{line[:cut]}{{replica="{replica}"}}{line[cut:]}'


def merge_replica_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of the replicas -> one text: each family's HELP / TYPE once, then its samples
    from every replica, each labelled with the replica's name."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in texts.items():
        family, fresh = None, False
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                if name != family:
                    family, fresh = name, name not in heads
                    heads.setdefault(name, [])
                    samples.setdefault(name, [])
                if fresh:
                    heads[name].append(line)
            elif line and not line.startswith("#") and family is not None:
                samples[family].append(_labelled(line, replica))
    out = [line for name in heads for line in (*heads[name], *samples[name])]
    return "\n".join(out) + ("\n" if out else "")
