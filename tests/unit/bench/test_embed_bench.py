"""`scaleinfer bench embed` end to end on a few sentences: per-chunk progress, the table and its JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scaleinfer import catalog


def test_quick_bench_embed_writes_progress_table_and_json(tmp_path):
    if not catalog.CATALOG["all-minilm-l6-v2"].installed:
        pytest.skip("all-minilm-l6-v2 is not installed (`scaleinfer pull all-minilm-l6-v2`)")
    got = subprocess.run([sys.executable, "-m", "scaleinfer", "bench", "embed", "--models", "all-minilm-l6-v2",
                          "--engines", "scaleinfer", "--num-sentences", "24", "--chunk", "12", "--threads", "1",
                          "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "12/24 sentences: scaleinfer" in got.stderr and "24/24 sentences: scaleinfer" in got.stderr
    [path] = tmp_path.glob("embed-*.json")
    report = json.loads(path.read_text())
    row = report["models"]["all-minilm-l6-v2"]["scaleinfer"]
    assert report["num_sentences"] == 24 and row["sentences_per_s"] > 0 and row["seconds"] > 0
