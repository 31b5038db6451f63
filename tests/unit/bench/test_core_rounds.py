"""`scaleinfer bench` interleaves the engines' pp512 / tg128 rounds: a worker answers one timed round per
command line, and ratios are medians of same-round ratios (robust to the machine drifting between
rounds)."""
from __future__ import annotations

import io
import json

from scaleinfer.bench.core import _ratio, format_table, serve_rounds


class _FakeAdapter:
    def __init__(self):
        self.calls = []

    def prefill_once(self, ids):
        self.calls.append(("prefill", len(ids)))
        return 0.5

    def decode_once(self, ids):
        self.calls.append(("decode", len(ids)))
        return 0.01, [7, 8, 9]


def test_worker_answers_one_round_per_line():
    adapter = _FakeAdapter()
    out = io.StringIO()
    serve_rounds(adapter, [1] * 512, [2] * 16, lines=io.StringIO("prefill\ndecode\nbogus\n"), out=out)
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert adapter.calls == [("prefill", 512), ("decode", 16)]
    assert replies[0] == {"prefill_tok_s": 1024.0}
    assert replies[1]["decode_tok_s"] == 100.0 and replies[1]["decode_token_ids"] == [7, 8, 9]
    assert "unknown command" in replies[2]["error"]


def test_ratios_pair_rounds_and_the_table_says_so():
    # The machine slows down by half during round 3: same-round ratios stay at 2x in four rounds of five,
    # while the ratio of the two medians would be 100 / 100 = 1x.
    ours = {"engine": "scaleinfer", "mode": "w4a8", "decode_rounds": [200, 200, 100, 100, 100],
            "prefill_rounds": [10, 10, 10, 10, 10], "mixed_tok_s": 30.0}
    theirs = {"engine": "llama.cpp", "mode": "gguf", "decode_rounds": [100, 100, 100, 50, 50],
              "prefill_rounds": [5, 5, 5, 5, 5], "mixed_tok_s": 10.0}
    for r in (ours, theirs):
        r["decode_tok_s"] = sorted(r["decode_rounds"])[2]
        r["prefill_tok_s"] = sorted(r["prefill_rounds"])[2]
    assert ours["decode_tok_s"] / theirs["decode_tok_s"] == 1.0
    assert _ratio(ours, theirs, "decode_tok_s") == 2.0
    assert _ratio(ours, theirs, "mixed_tok_s") == 3.0  # one run each: the plain ratio
    table = format_table([ours, theirs])
    assert "| w4a8 | 2.00x | 2.00x | 3.00x |" in table
    assert "medians of 5 interleaved rounds" in table
