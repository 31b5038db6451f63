"""`scaleinfer bench long-context` end to end on tiny sizes: the sweep measures each pattern in a worker
process, bounded patterns hold less KV than dense, and the stream-quality part scores every pattern."""
from __future__ import annotations

import json

from scaleinfer.cli import main


def test_long_context_bench_smoke(tmp_path, capsys):
    rc = main(["bench", "long-context", "--patterns", "causal;sinks=4,window=60", "--lengths", "200,400",
               "--chunk", "64", "--stream-tokens", "300", "--stream-patterns", "causal;window=32;sinks=4,window=28",
               "--threads", "1", "--output-dir", str(tmp_path)])
    assert rc == 0
    [path] = tmp_path.glob("long-context-*.json")
    record = json.loads(path.read_text())
    rows = {(r["pattern"], r["length"]): r for r in record["sweep"]}
    assert set(rows) == {(p, n) for p in ("causal", "sinks=4,window=60") for n in (200, 400)}
    assert rows["causal", 400]["kv_mib"] > 1.8 * rows["causal", 200]["kv_mib"]        # dense KV grows
    assert rows["sinks=4,window=60", 400]["kv_mib"] == rows["sinks=4,window=60", 200]["kv_mib"]  # flat
    assert rows["sinks=4,window=60", 400]["kv_mib"] < rows["causal", 400]["kv_mib"] / 2
    quality = {q["pattern"]: q for q in record["quality"]}
    assert set(quality) == {"causal", "window=32", "sinks=4,window=28"}
    assert all(1 < q["perplexity"] < 1e4 for q in quality.values())
    # a window is a restriction of dense attention: on real text it cannot help on average
    assert quality["window=32"]["perplexity"] > quality["causal"]["perplexity"]
    assert "prefill s" in capsys.readouterr().out


def test_bad_pattern_fails_before_any_work(tmp_path, capsys):
    rc = main(["bench", "long-context", "--patterns", "causal;windw=3", "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "unknown attention pattern key" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
