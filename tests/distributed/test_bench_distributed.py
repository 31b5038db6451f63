"""`scaleinfer bench distributed --quick` on SmolLM2 with tiny workloads: the table and the JSON have
their shape (every layout a row; one process and DP=2 measured; TP / PP rows say why they were not run
when this build lacks their flags; the router overhead and load average recorded). Not a speed check."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quick_bench_distributed_writes_its_table_and_json(tmp_path):
    cmd = [sys.executable, "-m", "scaleinfer", "bench", "distributed", "--quick", "--model", "smollm2-135m-instruct",
           "--kv-cache-memory", "64MiB", "--output-dir", str(tmp_path), "--log-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("distributed-*.json")
    record = json.loads(path.read_text())
    rows = {lay["name"]: lay for lay in record["layouts"]}
    assert list(rows) == ["1proc", "dp2", "tp2", "pp2"]
    for name in ("1proc", "dp2"):
        lay = rows[name]
        assert lay["status"] == "ok" and lay["decode_tok_s"] > 0 and lay["prefill_tok_s"] > 0, lay
        assert lay["mixed"]["output_tok_s"] > 0 and lay["mixed"]["ttft_p99_ms"] >= lay["mixed"]["ttft_p50_ms"] > 0
    for name in ("tp2", "pp2"):
        status = rows[name]["status"]
        assert status == "ok" or status.startswith(("unsupported: ", "failed: ")), status
    if rows["pp2"]["status"] == "ok":   # the bubble: the driver's stage-0 compute and logits wait, shares of the load
        mixed = rows["pp2"]["mixed"]
        assert 0 < mixed["stage0_busy"] <= 1 and 0 <= mixed["stage0_wait"] <= 1
        assert "stage0_busy" not in rows["1proc"]["mixed"]
    assert record["router_overhead"]["requests"] == 5 and len(record["loadavg"]["start"]) == 3
    table = done.stdout
    assert "| DP=2 x 1 thread | ok |" in table and "router overhead per request" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 5   # header + 4 layouts
