"""Prometheus metrics of the server (GET /metrics): fed per request by app.py and, at each scrape,
by a snapshot of the engine taken on its own thread.

One registry per app, so several apps (tests) never share counters.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
          "/metrics")


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state read on the engine thread (see snapshot())."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    num_steps: int
    max_batch_size: int
    last_batch_size: int
    num_prompt_tokens: int
    num_generation_tokens: int
    spec_num_draft_tokens: int = 0
    """Speculative decoding (0 when off): draft tokens checked, accepted, and the steps that checked them."""
    spec_num_accepted_tokens: int = 0
    spec_num_verified_steps: int = 0
    spec_mean_accepted_length: float = 0.0
    pipeline_stage0_s: float = 0.0
    """Pipeline parallel (0 otherwise): seconds the driver computed its stage, and waited for logits."""
    pipeline_wait_s: float = 0.0


def snapshot(engine) -> EngineSnapshot:
    """Run on the engine thread via AsyncEngine.call(snapshot)."""
    stats = engine.stats
    spec = engine.speculator.stats if engine.speculator is not None else None
    executor = getattr(engine, "executor", None)   # a pipeline executor counts its stage and its waits
    return EngineSnapshot(engine.scheduler.num_running, engine.scheduler.num_waiting, engine.kv_cache_usage,
                          engine.num_free_blocks, engine.num_kv_blocks, stats.num_steps, stats.max_batch_size,
                          stats.last_batch_size, stats.num_prompt_tokens, stats.num_generation_tokens,
                          *((spec.num_draft_tokens, spec.num_accepted_tokens, spec.num_steps_verified,
                             spec.mean_accepted_length) if spec is not None else (0, 0, 0, 0.0)),
                          getattr(executor, "stage_seconds", 0.0), getattr(executor, "wait_seconds", 0.0))


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}

        def counter(name, doc, extra=()):
            return Counter(name, doc, ["model_name", *extra], registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, ["model_name"], registry=r).labels(**labels)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r).labels(**labels)

        self._labels = labels
        self.http_requests = counter("scaleinfer_http_requests", "HTTP requests by route and status code.",
                                     ("route", "status"))
        self.finished = counter("scaleinfer_request_finished", "Generation requests finished, by finish reason.",
                                ("finish_reason",))
        self.prompt_tokens = counter("scaleinfer_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("scaleinfer_generation_tokens", "Tokens generated for clients.")
        self.ttft = histogram("scaleinfer_time_to_first_token_seconds",
                              "Seconds from receiving a request to its first output token.", _TTFT_BUCKETS)
        self.tpot = histogram("scaleinfer_time_per_output_token_seconds",
                              "Mean seconds per output token after the first, per request.", _TPOT_BUCKETS)
        self.e2e = histogram("scaleinfer_e2e_request_latency_seconds",
                             "Seconds from receiving a request to its last token.", _E2E_BUCKETS)
        self.running = gauge("scaleinfer_num_requests_running", "Requests the engine is running.")
        self.waiting = gauge("scaleinfer_num_requests_waiting", "Requests waiting for the engine to start them.")
        self.kv_usage = gauge("scaleinfer_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.kv_free = gauge("scaleinfer_kv_cache_free_blocks", "Free KV cache blocks.")
        self.kv_blocks = gauge("scaleinfer_kv_cache_blocks", "All KV cache blocks.")
        self.steps = gauge("scaleinfer_engine_steps", "Engine steps run since start.")
        self.max_batch = gauge("scaleinfer_max_batch_size", "Most requests the engine ran in one step.")
        self.last_batch = gauge("scaleinfer_last_batch_size", "Requests in the engine's latest step.")
        self.spec_drafts = gauge("scaleinfer_spec_decode_num_draft_tokens",
                                 "Draft tokens checked by speculative decoding since start.")
        self.spec_accepted = gauge("scaleinfer_spec_decode_num_accepted_tokens",
                                   "Draft tokens the model accepted since start.")
        self.spec_rate = gauge("scaleinfer_spec_decode_draft_acceptance_rate",
                               "Accepted / checked draft tokens since start (0 without speculation).")
        self.spec_length = gauge("scaleinfer_spec_decode_mean_accepted_length",
                                 "Tokens per step that checked drafts: accepted drafts + 1 (the speed-up bound).")
        self.pp_stage0 = gauge("scaleinfer_pipeline_stage0_compute_seconds",
                               "Seconds the driver computed its pipeline stage since start (0 without PP).")
        self.pp_wait = gauge("scaleinfer_pipeline_logits_wait_seconds",
                             "Seconds the driver waited for the last stage's logits since start (the bubble).")

    def record_http(self, path: str, status: int) -> None:
        route = path if path in ROUTES else "other"
        self.http_requests.labels(**self._labels, route=route, status=str(status)).inc()

    def record_finished(self, reasons: list[str | None], num_prompt_tokens: int, num_output_tokens: int,
                        ttft: float | None, tpot: float | None, e2e: float) -> None:
        for reason in reasons:
            self.finished.labels(**self._labels, finish_reason=reason or "abort").inc()
        self.prompt_tokens.labels(**self._labels).inc(num_prompt_tokens)
        self.generation_tokens.labels(**self._labels).inc(num_output_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.e2e.observe(e2e)

    def update_engine(self, snap: EngineSnapshot) -> None:
        self.running.set(snap.num_running)
        self.waiting.set(snap.num_waiting)
        self.kv_usage.set(snap.kv_cache_usage)
        self.kv_free.set(snap.num_free_blocks)
        self.kv_blocks.set(snap.num_blocks)
        self.steps.set(snap.num_steps)
        self.max_batch.set(snap.max_batch_size)
        self.last_batch.set(snap.last_batch_size)
        self.spec_drafts.set(snap.spec_num_draft_tokens)
        self.spec_accepted.set(snap.spec_num_accepted_tokens)
        self.spec_rate.set(snap.spec_num_accepted_tokens / snap.spec_num_draft_tokens
                           if snap.spec_num_draft_tokens else 0.0)
        self.spec_length.set(snap.spec_mean_accepted_length)
        self.pp_stage0.set(snap.pipeline_stage0_s)
        self.pp_wait.set(snap.pipeline_wait_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
