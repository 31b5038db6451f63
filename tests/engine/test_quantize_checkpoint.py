"""`scaleinfer quantize` writes a self-contained directory; `--model DIR` loads the packed tensors as
they are (no re-quantizing) and gives the same logits and greedy text as quantizing on the fly."""
from __future__ import annotations

import json
import os

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.cli import main
from scaleinfer.weights import quantized as checkpoint

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"


def _llm(model: str, quantization: str = "none") -> LLM:
    return LLM(model, kv_cache_memory="32MiB", max_model_len=128, quantization=quantization)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """mode -> directory written by the CLI (one per mode, shared by the tests below)."""
    dirs = {}

    def get(mode: str):
        if mode not in dirs:
            out = tmp_path_factory.mktemp("quantized") / mode
            assert main(["quantize", "--model", MODEL, "--quantization", mode, "--output", str(out)]) == 0
            dirs[mode] = out
        return dirs[mode]
    return get


@pytest.mark.parametrize("mode", ["int8", "int4", "w4a8", "int4-g64"])
def test_quantized_dir_equals_on_the_fly(written, monkeypatch, capsys, mode):
    out = written(mode)
    assert {"model.safetensors", checkpoint.CONFIG_FILE, "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(out))
    cfg = json.loads((out / checkpoint.CONFIG_FILE).read_text())
    assert cfg["quantization"]["mode"] == mode and cfg["model_config"]["architecture"] == "llama"

    ref = _llm(MODEL, mode)

    def no_requantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must not be quantized again")

    from scaleinfer.quantization import int4, int8
    monkeypatch.setattr(int8, "quantize_per_channel", no_requantizing)
    monkeypatch.setattr(int4, "quantize_groupwise", no_requantizing)
    loaded = _llm(str(out))
    monkeypatch.undo()

    head = loaded.engine.model.lm_head
    assert head.weight is None and head.qweight.dtype == torch.int8
    assert type(loaded.engine.model.layers[0].mlp.down_proj.quant_method).__name__ == {
        "int8": "Int8WeightOnly", "int4": "Int4WeightOnly", "w4a8": "W4A8", "int4-g64": "Int4WeightOnly"}[mode]
    qkv = loaded.engine.model.layers[0].self_attn.qkv_proj
    if mode == "int4-g64":  # re-rounded: int4 q/k and int8 v, written as the split layer and its two bands
        assert [type(p.quant_method).__name__ for p in qkv.parts] == ["Int4WeightOnly", "Int8WeightOnly"]
        assert cfg["quantization"]["layers"]["layers.0.self_attn.qkv_proj"] == {"method": "rows",
                                                                              "bands": [[0, 1], [2]]}
    ids = ref.tokenizer.encode(PROMPT + " a city that")
    assert loaded.tokenizer.encode(PROMPT) == ref.tokenizer.encode(PROMPT)
    assert loaded.tokenizer.eos_token_ids == ref.tokenizer.eos_token_ids
    assert loaded.tokenizer.chat_template == ref.tokenizer.chat_template
    diff = (loaded.engine.compute_logits(ids) - ref.engine.compute_logits(ids)).abs().max().item()
    assert diff <= 1e-5
    params = SamplingParams(temperature=0, max_tokens=12)
    a = loaded.generate(PROMPT, params)[0].outputs[0]
    b = ref.generate(PROMPT, params)[0].outputs[0]
    assert a.token_ids == b.token_ids and "Paris" in a.text


def test_quantize_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["quantize", "--model", MODEL, "--quantization", "int3", "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "int3" in err and "\n" not in err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["quantize", "--quantization", "int8", "--output", str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "\n" not in err

    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["quantize", "--quantization", "int8", "--output", str(a_file / "sub")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: cannot write")


def test_loading_rejects_a_different_mode_and_a_broken_dir(written, tmp_path):
    import shutil

    from scaleinfer.errors import ConfigError, WeightLoadError

    out = written("int8")
    with pytest.raises(ConfigError, match="already quantized with int8"):
        _llm(str(out), "int4")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightLoadError):
        _llm(str(broken))
    for bands in ([[0], [2]], None):  # a split QKV whose bands do not cover its shards, or are missing
        bad = tmp_path / f"bands-{bands is None}"
        shutil.copytree(written("int4-g64"), bad)
        cfg = json.loads((bad / checkpoint.CONFIG_FILE).read_text())
        cfg["quantization"]["layers"]["layers.0.self_attn.qkv_proj"]["bands"] = bands
        (bad / checkpoint.CONFIG_FILE).write_text(json.dumps(cfg))
        with pytest.raises(WeightLoadError, match="bands"):
            _llm(str(bad))
