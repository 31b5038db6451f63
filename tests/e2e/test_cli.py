"""The CLI as a user runs it (`python -m scaleinfer`, a process per test, the real default model): bad
input gives one line on stderr, exit code 2, no traceback; generate and chat answer."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "scaleinfer", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env=env)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, and exactly one error line (the start-up summary may precede it)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    others = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("error:", "INFO"))]
    assert len(errors) == 1 and not others, proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]


def test_missing_model_file(tmp_path):
    proc = run_cli("generate", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert_clean_error(proc, "not found")


def test_truncated_gguf(tmp_path, smollm2_gguf_path):
    bad = tmp_path / "truncated.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    proc = run_cli("generate", "hi", "--model", str(bad))
    assert_clean_error(proc)


def test_corrupt_full_size_gguf(tmp_path, smollm2_gguf_path):
    """Issue 14: a whole file whose second vocabulary string claims 2**62 bytes gave a 41-line traceback."""
    import shutil
    import struct

    bad = tmp_path / "corrupt.gguf"
    shutil.copyfile(smollm2_gguf_path, bad)
    with open(bad, "r+b") as f:
        head = f.read(1 << 20)
        key = head.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens")
        first = key + 4 + 4 + 8  # value type, element type, count; then the first string
        second = first + 8 + struct.unpack_from("<Q", head, first)[0]
        f.seek(second)
        f.write(struct.pack("<Q", 1 << 62))
    proc = run_cli("generate", "hi", "--model", str(bad), "--max-tokens", "4")
    assert_clean_error(proc, "not a valid GGUF", "claims 4611686018427387904 bytes")


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


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = run_cli("generate", "hi", "--model", str(path))
    assert_clean_error(proc, "bert", "llama", "qwen2")


def test_unreachable_hub():
    proc = run_cli("generate", "hi", "--model", "some-org/some-model")
    assert_clean_error(proc, "hub")


def test_chat_streams_replies_from_stdin():
    # fp32 weights: w4a8 (the default on this Q4_1 file) answers this prompt in French (tests/engine/test_api.py)
    proc = run_cli("chat", "--max-tokens", "24", "--kv-cache-memory", "64MiB", "--quantization", "none",
                   stdin="What is the capital of France?\nAnd of Germany?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "Berlin" in proc.stdout
    assert proc.stderr.count(" tokens in ") == 2  # one speed line per reply


def test_models_lists_the_catalog():
    proc = run_cli("models")
    assert proc.returncode == 0
    assert "smollm2-135m-instruct" in proc.stdout and "qwen2.5-coder-0.5b-instruct" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (("--ssl-certfile", "/nonexistent/cert.pem"), "--ssl-keyfile"),
    (("--ssl-certfile", "/nonexistent/cert.pem", "--ssl-keyfile", "/nonexistent/key.pem"), "cannot use"),
    (("--api-key", "a", "--api-key-file", "/nonexistent/key"), "not both"),
    (("--api-key-file", "/nonexistent/key"), "cannot read"),
    (("--max-request-bytes", "lots"), "--max-request-bytes"),
    (("--header-timeout", "0"), "--header-timeout"),
])
def test_bad_serve_security_flags_fail_before_loading(args, needle):
    proc = run_cli("serve", "--port", "1", *args)
    assert_clean_error(proc, needle)
