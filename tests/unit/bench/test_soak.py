"""`scaleinfer bench soak` pieces that need no server: the request mix (every malformed kind, each
really malformed), the RSS slope, the /metrics parser, the outcome bookkeeping and the verdict."""
from __future__ import annotations

import json
import random

import pytest

from scaleinfer.bench.soak import report
from scaleinfer.bench.soak.client import Outcome
from scaleinfer.bench.soak.mix import CHAT, COMPLETIONS, MALFORMED_KINDS, VALID, MixConfig, draw
from scaleinfer.bench.soak.run import duration
from scaleinfer.bench.soak.server import http_status_counts, metric, parse_metrics

CFG = MixConfig(model="m", max_model_len=64, max_tokens=8, disconnect_share=0.1, malformed_share=0.3,
                oversized_bytes=4096)


def _draws(n: int = 3000, cfg: MixConfig = CFG, seed: int = 0):
    rng = random.Random(seed)
    return [draw(rng, cfg) for _ in range(n)]


def _loads(body: bytes):
    return json.loads(body)


def test_mix_produces_every_kind_on_both_endpoints_and_both_stream_modes():
    reqs = _draws()
    assert {r.kind for r in reqs} == {VALID, *MALFORMED_KINDS}
    valid = [r for r in reqs if r.kind == VALID]
    assert {(r.endpoint, r.stream) for r in valid} == {(e, s) for e in (CHAT, COMPLETIONS) for s in (True, False)}
    cut = [r for r in valid if r.disconnects]
    assert any(r.stream and r.disconnect_after_events for r in cut)
    assert any(not r.stream and r.disconnect_after_s for r in cut)
    assert 0.05 < len(cut) / len(valid) < 0.15  # the 10% share
    assert 0.25 < sum(r.malformed for r in reqs) / len(reqs) < 0.35
    assert not any(r.disconnects for r in reqs if r.malformed)


def test_mix_is_reproducible_from_its_seed():
    assert _draws(200, seed=7) == _draws(200, seed=7)
    assert _draws(200, seed=7) != _draws(200, seed=8)


def test_valid_bodies_are_well_formed_requests():
    for r in _draws(500):
        if r.kind != VALID:
            continue
        body = _loads(r.body)
        assert body["model"] == "m" and body["stream"] is r.stream
        key = "messages" if r.endpoint == CHAT else "prompt"
        assert body[key]
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        assert 1 <= limit <= (64 if r.disconnects else CFG.max_tokens)
        assert body.get("n", 1) in (1, 2)


def _by_kind(kind: str):
    found = [r for r in _draws() if r.kind == kind]
    assert found, kind
    return found


def test_bad_json_is_not_json():
    for r in _by_kind("bad_json"):
        with pytest.raises(ValueError):
            _loads(r.body)


def test_wrong_type_has_a_field_of_the_wrong_type():
    for r in _by_kind("wrong_type"):
        body = _loads(r.body)
        wrong = [isinstance(body.get("max_tokens"), str), isinstance(body.get("temperature"), str),
                 isinstance(body.get("n"), list), isinstance(body.get("stream_options"), str),
                 isinstance(body.get("messages"), str), isinstance(body.get("prompt"), dict)]
        assert any(wrong), body


def test_unknown_model_names_another_model():
    assert all(_loads(r.body)["model"].startswith("no-such-model-") for r in _by_kind("unknown_model"))


def test_too_long_prompt_has_more_words_than_the_context():
    for r in _by_kind("too_long_prompt"):
        body = _loads(r.body)
        text = body["messages"][0]["content"] if r.endpoint == CHAT else body["prompt"]
        assert len(text.split()) > CFG.max_model_len


def test_out_of_range_breaks_a_bound():
    for r in _by_kind("out_of_range"):
        b = _loads(r.body)
        assert (b.get("n", 1) < 1 or b.get("n", 1) > 1000 or b.get("max_tokens", 1) < 1 or b["temperature"] < 0
                or not 0 < b.get("top_p", 1) <= 1), b


def test_lone_surrogate_travels_as_a_json_escape():
    for r in _by_kind("lone_surrogate"):
        assert any(e in r.body for e in (b"\\ud800", b"\\udfff", b"\\udc00"))
        body = _loads(r.body)  # still valid JSON: the server must refuse it itself
        text = body["messages"][0]["content"] if r.endpoint == CHAT else body["prompt"]
        with pytest.raises(UnicodeEncodeError):
            text.encode("utf-8")


def test_missing_field_lacks_the_prompt_or_a_role():
    for r in _by_kind("missing_field"):
        body = _loads(r.body)
        if r.endpoint == COMPLETIONS:
            assert "prompt" not in body
        else:
            assert "messages" not in body or "role" not in body["messages"][0]


def test_oversized_body_exceeds_the_set_size():
    assert all(len(r.body) > CFG.oversized_bytes for r in _by_kind("oversized_body"))


# ---- the numbers --------------------------------------------------------------------------------
def test_rss_slope_is_the_least_squares_slope_after_warmup():
    mib = report.MIB
    # 100 MiB flat for the first minute (warm-up), then + 3 MiB per minute with +-1 MiB wiggle
    samples = [(t, 100 * mib) for t in range(0, 60, 5)]
    samples += [(t, int((100 + 3 * (t - 60) / 60 + (1 if i % 2 else -1)) * mib))
                for i, t in enumerate(range(60, 600, 5))]
    assert report.rss_slope(samples, 60) == pytest.approx(3.0, abs=0.05)
    flat = [(t, 500 * mib + (t % 7) * 1000) for t in range(0, 600, 5)]
    assert abs(report.rss_slope(flat, 60)) < 0.01
    assert report.rss_slope(samples, 599) is None  # too few samples after the warm-up


def test_default_warmup_is_two_minutes_or_half_a_short_run():
    assert report.default_warmup(600) == 120 and report.default_warmup(120) == 60
    # a 2-minute run leaves 60 s after warm-up: its RSS slope is reported but not judged
    assert report.MIN_RSS_SPAN_S > 120 - report.default_warmup(120)


def test_summarize_rss_reports_start_end_and_slope():
    mib = report.MIB
    s = report.summarize_rss([(0, 100 * mib), (10, 200 * mib), (20, 201 * mib), (30, 202 * mib), (40, 203 * mib)], 10)
    assert (s["start_mib"], s["after_warmup_mib"], s["end_mib"], s["max_mib"]) == (100, 200, 203, 203)
    assert s["post_warmup_samples"] == 4 and s["post_warmup_span_s"] == 30
    assert s["slope_mib_per_min"] == pytest.approx(6.0)


def test_percentile_is_nearest_rank():
    values = [i / 100 for i in range(1, 101)]
    assert report.percentile(values, 50) == 0.5 and report.percentile(values, 99) == 0.99
    assert report.percentile([], 50) is None and report.percentile([3.0], 99) == 3.0


def test_in_band_5xx_counts_as_a_5xx():
    assert Outcome(VALID, CHAT, True, 0.0, status=200, in_band_error="internal_error:500").is_5xx
    assert Outcome(VALID, CHAT, True, 0.0, status=200, in_band_error="service_unavailable:shutting_down").is_5xx
    assert not Outcome(VALID, CHAT, True, 0.0, status=200, in_band_error="invalid_request_error:400").is_5xx
    assert Outcome("bad_json", CHAT, False, 0.0, status=500).is_5xx
    assert not Outcome("bad_json", CHAT, False, 0.0, status=400).is_5xx


def _outcomes() -> list[Outcome]:
    return [Outcome(VALID, CHAT, True, 0.0, status=200, done=True, ttft=0.1, completion_tokens=4),
            Outcome(VALID, COMPLETIONS, False, 0.0, status=200, done=True, completion_tokens=6),
            Outcome(VALID, CHAT, True, 0.0, status=200, disconnected=True, ttft=0.3),
            Outcome(VALID, COMPLETIONS, False, 0.0, disconnected=True),
            Outcome("bad_json", CHAT, False, 0.0, status=400),
            Outcome("unknown_model", COMPLETIONS, True, 0.0, status=404)]


def _summary(**changes) -> dict:
    s = report.summarize_requests(_outcomes(), 10.0)
    s |= {"kv": {"blocks": 100, "free_start": 100, "free_end": 100}, "server_5xx": 0, "server_exit_code": 0,
          "rss": {"slope_mib_per_min": 0.5, "post_warmup_span_s": 480.0}}
    return s | changes


def test_summarize_requests_counts_what_the_clients_saw():
    s = _summary()
    assert (s["valid"], s["valid_completed"], s["valid_failed"], s["malformed"]) == (4, 2, 0, 2)
    assert s["disconnects"] == {"stream": 1, "non_stream": 1, "total": 2}
    assert s["status_counts"] == {"200": 3, "cut": 1, "400": 1, "404": 1}
    assert s["output_tokens"] == 10 and s["output_tokens_per_s"] == 1.0
    assert s["ttft_ms"]["count"] == 2 and s["ttft_ms"]["p50"] == pytest.approx(100)
    assert s["count_5xx"] == 0 and s["malformed_not_4xx"] == 0
    assert "FAIL" not in report.format_table(s | {"verdict": report.verdict(s, 2.0)})


def test_verdict_passes_a_clean_run():
    v = report.verdict(_summary(), 2.0)
    assert v["passed"] and v["failed"] == []


@pytest.mark.parametrize("changes,failed", [
    ({"count_5xx": 1}, "no_5xx"),
    ({"server_5xx": 2}, "no_5xx"),
    ({"malformed_not_4xx": 1}, "malformed_4xx"),
    ({"valid_failed": 1}, "valid_ok"),
    ({"kv": {"blocks": 100, "free_start": 100, "free_end": 97}}, "kv_returned"),
    ({"kv": {"blocks": 100, "free_start": 100, "free_end": None}}, "kv_returned"),
    ({"rss": {"slope_mib_per_min": 2.5, "post_warmup_span_s": 480.0}}, "rss_flat"),
    ({"server_exit_code": -9}, "clean_exit"),
])
def test_verdict_fails_each_check(changes, failed):
    v = report.verdict(_summary(**changes), 2.0)
    assert not v["passed"] and v["failed"] == [failed]


def test_verdict_leaves_unjudged_checks_open():
    v = report.verdict(_summary(rss={"slope_mib_per_min": None}, server_exit_code=None), 2.0)
    assert v["passed"] and v["checks"]["rss_flat"] is None and v["checks"]["clean_exit"] is None
    short = report.verdict(_summary(rss={"slope_mib_per_min": 50.0, "post_warmup_span_s": 60.0}), 2.0)
    assert short["passed"] and short["checks"]["rss_flat"] is None  # 60 s tell nothing about a leak


def test_metrics_parser_sums_over_labels():
    text = ('# HELP x\nscaleinfer_kv_cache_free_blocks{model_name="m"} 97.0\n'
            'scaleinfer_http_requests_total{model_name="m",route="/v1/completions",status="200"} 5.0\n'
            'scaleinfer_http_requests_total{model_name="m",route="other",status="200"} 1.0\n'
            'scaleinfer_http_requests_total{model_name="m",route="/v1/completions",status="500"} 2.0\n')
    samples = parse_metrics(text)
    assert metric(samples, "scaleinfer_kv_cache_free_blocks") == 97
    assert metric(samples, "scaleinfer_http_requests_total", status="200") == 6
    assert metric(samples, "nothing") is None
    assert http_status_counts(samples) == {"200": 6, "500": 2}


def test_duration_flag_reads_units():
    assert duration("600") == 600 and duration("90s") == 90 and duration("10m") == 600 and duration("1.5h") == 5400
    for bad in ("ten", "0", "-5m", "m"):
        with pytest.raises(Exception, match="duration"):
            duration(bad)


def _one_shot_server(answer: bytes, read_body: bool):
    """A socket server on 127.0.0.1 that reads one request head (and the body, if read_body), sends
    `answer` and closes; returns its URL."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        with conn, srv:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            if read_body:
                length = int(data.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                while len(data.partition(b"\r\n\r\n")[2]) < length:
                    data += conn.recv(1 << 20)
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/v1/completions"


def test_raw_post_sees_a_413_sent_before_the_body_was_read():
    from scaleinfer.bench.soak.client import _raw_post

    body = b'{"prompt": "' + b"x" * (16 << 20) + b'"}'
    url = _one_shot_server(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                           read_body=False)
    assert _raw_post(url, body, 30) == (413, "{}")
    url = _one_shot_server(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{\"a\":1}",
                           read_body=True)
    assert _raw_post(url, body, 30) == (200, '{"a":1}')


@pytest.mark.parametrize("argv,message", [
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--disconnect-share", "1.5"], "--disconnect-share must be in [0, 1]"),
    (["--server-pid", "1"], "--server-pid goes with --url"),
    (["--url", "http://127.0.0.1:1", "--start-timeout", "0.5"], "is the server at --url running?"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    from scaleinfer.cli import main

    assert main(["bench", "soak", "--no-save", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
