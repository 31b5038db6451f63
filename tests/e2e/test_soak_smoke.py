"""A short `scaleinfer bench soak` end to end: it starts the real server itself, sends 15 s of mixed
traffic from 8 clients (streams, cut streams, malformed requests of every kind) and must see no 5xx and
every KV block back at idle. The RSS slope is not judged: 15 s tell nothing about a leak."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
MODEL = os.environ.get("SCALEINFER_E2E_MODEL", "smollm2-135m-instruct")  # as conftest.py


def test_short_soak_has_no_5xx_and_returns_every_kv_block(tmp_path):
    cmd = [sys.executable, "-m", "scaleinfer", "bench", "soak", "--model", MODEL, "--threads", "1",
           "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--duration", "15", "--concurrency", "8",
           "--max-tokens", "4", "--rss-interval", "1", "--start-timeout", "900",
           "--request-timeout", "240", "--oversized-mib", "8", "--server-log", str(tmp_path / "server.log"),
           "--result-dir", str(tmp_path), "--result-filename", "soak.json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert (tmp_path / "soak.json").exists(), f"no result (exit {done.returncode}):\n{done.stderr[-3000:]}"
    record = json.loads((tmp_path / "soak.json").read_text())
    log = (tmp_path / "server.log").read_text(errors="replace")[-3000:]
    assert record["count_5xx"] == 0 and record["server_5xx"] == 0, \
        f"5xx: {record['examples_5xx']} {record['server_status_counts']}\n{log}"
    kv = record["kv"]
    assert kv["free_start"] == kv["blocks"] and kv["free_end"] == kv["free_start"], kv
    assert record["valid_completed"] > 0 and record["malformed"] > 0, record["status_counts"]
    assert record["rss"]["samples"] >= 3 and record["rss"]["start_mib"] > 0
    assert record["server_exit_code"] == 0, log
    assert "Soak Result" in done.stdout
