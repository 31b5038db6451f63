"""Bad input on the command line: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "scaleinfer", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env=env)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


def test_missing_model_file(tmp_path):
    proc = run_cli("generate", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert_clean_error(proc, "not found")


def test_truncated_gguf(tmp_path, smollm2_gguf_path):
    bad = tmp_path / "truncated.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    proc = run_cli("generate", "hi", "--model", str(bad))
    assert_clean_error(proc)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    proc = run_cli("generate", "hi", "--model", str(bad))
    assert_clean_error(proc)


def test_unknown_catalog_name():
    proc = run_cli("generate", "hi", "--model", "no-such-model-xyz")
    assert_clean_error(proc)


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--max-tokens", "0", "max_tokens"),
])
def test_invalid_sampling_parameters(flag, value, needle):
    proc = run_cli("generate", "hi", flag, value, "--kv-cache-memory", "64MiB")
    assert_clean_error(proc, needle)


def test_prompt_longer_than_context():
    proc = run_cli("generate", "hello " * 200, "--max-model-len", "64", "--kv-cache-memory", "64MiB")
    assert_clean_error(proc, "--max-model-len")


def test_bad_kv_cache_memory():
    proc = run_cli("generate", "hi", "--kv-cache-memory", "lots")
    assert_clean_error(proc, "kv")


def test_generate_works():
    proc = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--kv-cache-memory", "64MiB")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tok/s" in proc.stderr
