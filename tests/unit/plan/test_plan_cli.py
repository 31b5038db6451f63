"""`scaleinfer plan` from the command line: the table, --json, a catalog model read from its GGUF header,
one-line errors with exit code 2, exit code 1 when nothing fits."""
from __future__ import annotations

import json

import pytest

from scaleinfer import catalog
from scaleinfer.cli import main
from scaleinfer.plan.command import resolve_shape
from scaleinfer.plan.shapes import named_shape


def test_table_and_recommendation(capsys):
    assert main(["plan", "--model", "Llama-3-70B", "--devices", "8xH100", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3-70B: 70.55B params" in out and "tp8 pp1 dp1" in out
    assert "not fitting: tp1 pp1 dp8: out of memory" in out and "recommended: tp" in out


def test_json_with_fixed_sizes(capsys):
    assert main(["plan", "--model", "Qwen2.5-72B", "--devices", "8xH200", "--tp", "8", "--batch", "32",
                 "--quantization", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recommended"] == "tp8 pp1 dp1" and len(data["layouts"]) == 1
    row = data["layouts"][0]
    assert row["batch"] == 32 and row["fits"] and data["workload"]["weights"] == "fp8"
    assert row["kv_bytes"] == pytest.approx(32 * 4096 * row["kv_bytes_per_token"])


def test_nothing_fits_exits_1(capsys):
    assert main(["plan", "--model", "Llama-3-70B", "--devices", "L4"]) == 1
    assert "recommended: none" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-17", "--devices", "8xH100"], "is not a named shape"),
    (["--model", "Llama-3-8B", "--devices", "8xTPU"], "unknown device"),
    (["--model", "Llama-3-8B", "--devices", "8xH100", "--tp", "3"], "does not divide"),
    (["--model", "Llama-3-8B", "--devices", "H100", "--context", "0"], "--context must be at least 1"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_catalog_model_shape_from_its_gguf():
    """The 1.5B's GGUF header gives the published Qwen2.5-1.5B shape (nothing but the header is read), except
    that this GGUF stores its LM head apart from the embedding (output.weight, Q6_K): untied, as we load it."""
    if not catalog.CATALOG["qwen2.5-coder-1.5b-instruct"].installed:
        pytest.skip("qwen2.5-coder-1.5b-instruct is not installed")
    shape = resolve_shape("qwen2.5-coder-1.5b-instruct")
    assert shape.name == "qwen2.5-coder-1.5b-instruct"
    fields = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "vocab_size")
    assert not shape.tie_word_embeddings
    assert [getattr(shape, f) for f in fields] == [getattr(named_shape("Qwen2.5-1.5B"), f) for f in fields]
