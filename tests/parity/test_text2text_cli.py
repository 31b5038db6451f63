"""`scaleinfer translate` / `summarize` on a tiny random T5 and BART (HF-built, offline): one output line per
input, equal to LLM.generate's beam search over the prefixed input; a decoder-only model is refused."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402
from scaleinfer.cli import main  # noqa: E402

from tests.parity.seq2seq_tiny import build  # noqa: E402

ENGINE = ["--quantization", "none", "--max-model-len", "64", "--kv-cache-memory", "4MiB", "--kv-cache-dtype",
          "float32", "--max-tokens", "8"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return build("t5", str(tmp_path_factory.mktemp("t5")))


def test_translate_and_summarize_t5(t5, capsys, monkeypatch):
    llm = LLM(t5, quantization="none", max_model_len=64, kv_cache_memory="4MiB", kv_cache_dtype="float32")
    beam = SamplingParams(temperature=0, use_beam_search=True, n=1, best_of=4, max_tokens=8)
    texts = ["w5 w6 w7 w8", "w20 w30 w40"]
    want = [o.outputs[0].text.strip() for o in llm.generate([f"translate English to French: {t}" for t in texts], beam)]
    assert main(["translate", *texts, "--model", t5, "--target-lang", "fr", *ENGINE]) == 0
    assert capsys.readouterr().out.splitlines() == want
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("w9 w10 w11\n\nw12\n"))
    want = [o.outputs[0].text.strip() for o in llm.generate(["summarize: w9 w10 w11", "summarize: w12"], beam)]
    assert main(["summarize", "--model", t5, *ENGINE]) == 0
    assert capsys.readouterr().out.splitlines() == want


def test_bart_gets_no_prefix_and_greedy_works(tmp_path, capsys):
    path = build("bart", str(tmp_path / "bart"))
    llm = LLM(path, quantization="none", max_model_len=64, kv_cache_memory="4MiB", kv_cache_dtype="float32")
    want = llm.generate(["w5 w6 w7"], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text.strip()
    assert main(["summarize", "w5 w6 w7", "--num-beams", "1", "--model", path, *ENGINE]) == 0
    assert capsys.readouterr().out.splitlines() == [want]


def test_decoder_only_model_is_refused(capsys):
    assert main(["translate", "hello", "--max-model-len", "64", "--kv-cache-memory", "16MiB"]) == 2
    err = capsys.readouterr().err
    assert "decoder-only" in err and err.count("\n") == 1
