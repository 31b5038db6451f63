"""The data-parallel router: one OpenAI endpoint in front of several engine replicas (`scaleinfer serve
--data-parallel-size N` starts them on this host; `scaleinfer router --replica URL ...` fronts replicas on
other hosts).

    client -> Gate (API key, limits) -> proxy.RouterApp -> policies (which replica) -> replicas (health,
              load, HTTP client) -> a replica's own `scaleinfer serve`

policies.py is pure (no I/O); replicas.py owns the health checks; metrics.py the router's counters and
the per-replica merge of /metrics; launch.py starts local replicas; server.py runs it all under uvicorn.
"""
