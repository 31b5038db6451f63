"""The speculative flags on the engine commands, and the bench's rows and workloads (no model)."""
from __future__ import annotations

import argparse

import pytest

from scaleinfer.bench.speculative import add_arguments, rows_from, workload_messages
from scaleinfer.cli import build_parser
from scaleinfer.cli.common import speculative_from_args
from scaleinfer.errors import ConfigError


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"], ["bench"]])
def test_engine_commands_take_the_speculative_flags(command):
    args = build_parser().parse_args(command[:1] + ["--speculative-method", "ngram", "--num-speculative-tokens", "3"]
                                     + command[1:])
    cfg = speculative_from_args(args)
    assert (cfg.method, cfg.num_speculative_tokens) == ("ngram", 3)
    args = build_parser().parse_args(command[:1] + ["--speculative-model", "d"] + command[1:])
    assert speculative_from_args(args).method == "draft"
    assert not speculative_from_args(build_parser().parse_args(command)).enabled


def bench_args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_bench_rows_and_the_distilled_draft_hook():
    rows = rows_from(bench_args("--extra-draft", "distilled=out/student", "--num-speculative-tokens", "5"))
    assert [name for name, _ in rows] == ["none", "ngram", "draft", "distilled"]
    assert rows[3][1] == {"method": "draft", "model": "out/student", "num_speculative_tokens": 5}
    assert [n for n, _ in rows_from(bench_args("--only", "none,ngram"))] == ["none", "ngram"]
    with pytest.raises(ConfigError, match="NAME=MODEL"):
        rows_from(bench_args("--extra-draft", "student"))


def test_bench_workloads(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x" * 5000)
    msgs = workload_messages(["code-edit", "summarize", "chat"], str(text))
    assert "class Inventory" in msgs["code-edit"][0]["content"] and "xxxx" in msgs["summarize"][0]["content"]
    with pytest.raises(ConfigError, match="--data-file"):
        workload_messages(["summarize"], str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="unknown workload"):
        workload_messages(["poetry"], str(text))
