"""`scaleinfer embed` and `scaleinfer export-onnx` as a user runs them: JSON lines out, texts from arguments or
stdin, one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def scaleinfer(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaleinfer", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)


def test_embed_arguments_and_stdin():
    from scaleinfer import LLM

    expected = [o.outputs.embedding for o in LLM("all-minilm-l6-v2").embed(["hello world", "今天天气很好"])]
    for proc in (scaleinfer("embed", "--threads", "1", "hello world", "今天天气很好"),
                 scaleinfer("embed", "--threads", "1", stdin="hello world\n\n今天天气很好\n")):
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [line["index"] for line in lines] == [0, 1] and lines[1]["text"] == "今天天气很好"
        for line, exp in zip(lines, expected):
            assert len(line["embedding"]) == 384
            assert max(abs(a - b) for a, b in zip(line["embedding"], exp)) < 1e-6


@pytest.mark.parametrize("args, words", [
    (("embed", "--model", "smollm2-135m-instruct", "hi"), "not an encoder"),
    (("embed", "word " * 300), "--truncate-prompt-tokens"),
    (("embed", "--dimensions", "64", "hi"), "matryoshka"),
])
def test_errors_are_one_line(args, words):
    proc = scaleinfer(*args)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_export_onnx_then_onnxruntime_backend(tmp_path):
    out = tmp_path / "onnx"
    proc = scaleinfer("export-onnx", "--threads", "1", "--output", str(out))
    assert proc.returncode == 0 and (out / "model.onnx").is_file(), proc.stderr
    ours = scaleinfer("embed", "--threads", "1", "a short one", "and a somewhat longer sentence to pad against")
    theirs = scaleinfer("embed", "--threads", "1", "--backend", "onnxruntime", "--onnx-dir", str(out),
                        "a short one", "and a somewhat longer sentence to pad against")
    assert theirs.returncode == 0, theirs.stderr
    for a, b in zip(ours.stdout.splitlines(), theirs.stdout.splitlines()):
        assert max(abs(x - y) for x, y in zip(json.loads(a)["embedding"], json.loads(b)["embedding"])) < 1e-4
