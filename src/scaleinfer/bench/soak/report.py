"""The soak's numbers and verdict: status counts, TTFT percentiles, throughput, the KV block balance,
the least-squares RSS slope after warm-up, the pass / fail checks, and the printed table.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter

from scaleinfer.bench.soak.client import Outcome
from scaleinfer.bench.soak.mix import VALID

MIB = 2**20
MIN_RSS_SPAN_S = 120.0
"""The RSS slope is judged only over at least this many seconds after warm-up (else: not judged)."""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def default_warmup(duration_s: float) -> float:
    """Seconds of RSS left out of the slope: the server's RSS climbs for about two minutes under load
    (allocator pools, the KV cache's pages written the first time), so 120 s, or half of a short run."""
    return 120.0 if duration_s >= 240 else duration_s / 2


def rss_slope(samples: list[tuple[float, int]], warmup_s: float) -> float | None:
    """Least-squares slope in MiB/min of RSS over the samples taken at or after warmup_s seconds;
    None with fewer than 3 such samples (no trend can be told)."""
    post = [(t / 60, rss / MIB) for t, rss in samples if t >= warmup_s]
    if len(post) < 3:
        return None
    mx = statistics.fmean(x for x, _ in post)
    my = statistics.fmean(y for _, y in post)
    sxx = sum((x - mx) ** 2 for x, _ in post)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in post) / sxx


def _status_key(o: Outcome) -> str:
    return str(o.status) if o.status is not None else ("cut" if o.disconnected else "none")


def _examples(outcomes: list[Outcome], limit: int = 8) -> list[str]:
    return [f"{o.kind} {o.endpoint} stream={o.stream} at {o.start:.1f} s, {o.latency:.2f} s: {_status_key(o)} "
            f"{o.in_band_error or ''} {o.error}".strip() for o in outcomes[:limit]]


def summarize_requests(outcomes: list[Outcome], duration_s: float) -> dict:
    """Everything the client side saw."""
    valid = [o for o in outcomes if o.kind == VALID]
    malformed = [o for o in outcomes if o.kind != VALID]
    by_kind: dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[_status_key(o)] += 1
    five = [o for o in outcomes if o.is_5xx]
    not_4xx = [o for o in malformed if o.status is None or not 400 <= o.status < 500]
    cut = [o for o in valid if o.disconnected]
    failed = [o for o in valid if not o.disconnected and (o.status != 200 or not o.done or o.in_band_error)]
    completed = [o for o in valid if not o.disconnected and o.done and o.status == 200 and not o.in_band_error]
    ttfts = [o.ttft for o in valid if o.ttft is not None]
    out_tokens = sum(o.completion_tokens for o in completed)
    return {
        "duration_s": duration_s, "requests": len(outcomes),
        "status_counts": dict(Counter(_status_key(o) for o in outcomes)),
        "status_by_kind": {k: dict(c) for k, c in sorted(by_kind.items())},
        "in_band_errors": dict(Counter(o.in_band_error for o in outcomes if o.in_band_error)),
        "count_5xx": len(five), "examples_5xx": _examples(five),
        "malformed": len(malformed), "malformed_not_4xx": len(not_4xx),
        "examples_malformed_not_4xx": _examples(not_4xx),
        "valid": len(valid), "valid_completed": len(completed), "valid_failed": len(failed),
        "examples_valid_failed": _examples(failed),
        "disconnects": {"stream": sum(o.stream for o in cut), "non_stream": sum(not o.stream for o in cut),
                        "total": len(cut)},
        "ttft_ms": {"count": len(ttfts), "p50": _ms(percentile(ttfts, 50)), "p99": _ms(percentile(ttfts, 99)),
                    "mean": _ms(statistics.fmean(ttfts) if ttfts else None)},
        "requests_per_s": len(outcomes) / duration_s if duration_s else 0.0,
        "completed_per_s": len(completed) / duration_s if duration_s else 0.0,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration_s if duration_s else 0.0,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def summarize_rss(samples: list[tuple[float, int]], warmup_s: float) -> dict:
    if not samples:
        return {"samples": 0, "warmup_s": warmup_s, "slope_mib_per_min": None}
    post = [(t, rss) for t, rss in samples if t >= warmup_s]
    return {"samples": len(samples), "warmup_s": warmup_s, "post_warmup_samples": len(post),
            "post_warmup_span_s": post[-1][0] - post[0][0] if post else 0.0,
            "start_mib": samples[0][1] / MIB, "after_warmup_mib": post[0][1] / MIB if post else None,
            "end_mib": samples[-1][1] / MIB, "max_mib": max(r for _, r in samples) / MIB,
            "slope_mib_per_min": rss_slope(samples, warmup_s),
            "series": [[round(t, 1), round(r / MIB, 1)] for t, r in samples]}


def verdict(summary: dict, max_rss_slope: float) -> dict:
    """Pass / fail of each check (None: not judged) and the overall result.

    no_5xx: no 5xx status or in-band 5xx error seen by the clients nor counted by the server;
    malformed_4xx: every malformed request got a 4xx; valid_ok: every valid request that was not cut
    completed; kv_returned: free KV blocks at idle after the run == before; rss_flat: the RSS slope after
    warm-up <= max_rss_slope MiB/min (judged over >= MIN_RSS_SPAN_S); clean_exit: the server exited 0
    after SIGTERM.
    """
    kv, rss = summary.get("kv") or {}, summary.get("rss") or {}
    slope = rss.get("slope_mib_per_min")
    server_5xx = summary.get("server_5xx")
    checks = {
        "no_5xx": summary["count_5xx"] == 0 and not server_5xx,
        "malformed_4xx": summary["malformed_not_4xx"] == 0,
        "valid_ok": summary["valid_failed"] == 0,
        "kv_returned": None if kv.get("free_start") is None else kv.get("free_end") == kv["free_start"],
        "rss_flat": None if slope is None or rss.get("post_warmup_span_s", 0) < MIN_RSS_SPAN_S
        else slope <= max_rss_slope,
        "clean_exit": None if summary.get("server_exit_code") is None else summary["server_exit_code"] == 0,
    }
    return {"checks": checks, "passed": all(v is not False for v in checks.values()),
            "failed": [k for k, v in checks.items() if v is False], "max_rss_slope_mib_per_min": max_rss_slope}


def _fmt(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def format_table(s: dict) -> str:
    lines = ["{:=^64}".format(" Soak Result ")]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<40}{value:>24}")

    row("Duration (s):", _fmt(s["duration_s"], "{:.1f}"))
    row("Requests (valid / malformed):", f"{s['valid']} / {s['malformed']}")
    row("Valid completed / failed:", f"{s['valid_completed']} / {s['valid_failed']}")
    row("Disconnects (stream / non-stream):", f"{s['disconnects']['stream']} / {s['disconnects']['non_stream']}")
    row("Requests/s (all):", _fmt(s["requests_per_s"]))
    row("Completed requests/s:", _fmt(s["completed_per_s"]))
    row("Output tokens/s:", _fmt(s["output_tokens_per_s"]))
    row("TTFT p50 / p99 (ms):", f"{_fmt(s['ttft_ms']['p50'], '{:.0f}')} / {_fmt(s['ttft_ms']['p99'], '{:.0f}')}")
    lines.append("{:-^64}".format(" Status codes (client) "))
    for code, n in sorted(s["status_counts"].items()):
        row(f"  {code}:", str(n))
    row("5xx seen by clients / counted by server:", f"{s['count_5xx']} / {_fmt(s.get('server_5xx'), '{}')}")
    row("Malformed not answered 4xx:", str(s["malformed_not_4xx"]))
    kv, rss = s.get("kv") or {}, s.get("rss") or {}
    lines.append("{:-^64}".format(" Server "))
    row("KV free blocks start / end (of all):",
        f"{_fmt(kv.get('free_start'), '{:.0f}')} / {_fmt(kv.get('free_end'), '{:.0f}')} "
        f"({_fmt(kv.get('blocks'), '{:.0f}')})")
    row("RSS start / end / max (MiB):", f"{_fmt(rss.get('start_mib'), '{:.0f}')} / "
        f"{_fmt(rss.get('end_mib'), '{:.0f}')} / {_fmt(rss.get('max_mib'), '{:.0f}')}")
    row(f"RSS slope after {rss.get('warmup_s', 0):.0f} s (MiB/min):", _fmt(rss.get("slope_mib_per_min"), "{:+.3f}"))
    row("Server exit code:", _fmt(s.get("server_exit_code"), "{}"))
    v = s.get("verdict") or {}
    lines.append("{:-^64}".format(" Verdict "))
    for name, ok in (v.get("checks") or {}).items():
        row(f"  {name}:", {True: "ok", False: "FAIL", None: "not judged"}[ok])
    row("Result:", "PASS" if v.get("passed") else "FAIL")
    lines.append("=" * 64)
    return "\n".join(lines)
