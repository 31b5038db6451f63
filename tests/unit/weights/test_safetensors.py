"""HF model directories: config.json, single and sharded safetensors, tokenizer files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from scaleinfer.errors import UnsupportedModelError, WeightLoadError
from scaleinfer.weights.loader import open_checkpoint

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1,
          "eos_token_id": 2}


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(16, 64, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g).half(),
            "model.norm.weight": torch.ones(64)}


def write_dir(path, smollm2_tokenizer, config=None, sharded=False):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    weights = tensors()
    if sharded:
        names = list(weights)
        shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
        for shard, keys in shards.items():
            save_file({k: weights[k] for k in keys}, str(path / shard))
        index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(weights, str(path / "model.safetensors"))
    smollm2_tokenizer.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
         "add_bos_token": True}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return str(path)


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_directory(tmp_path, smollm2_tokenizer, sharded):
    ckpt = open_checkpoint(write_dir(tmp_path / "m", smollm2_tokenizer, sharded=sharded))
    assert ckpt.format == "safetensors" and ckpt.num_tensors == 3
    cfg = ckpt.config
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 1, 4, 2, 16)
    assert cfg.tie_word_embeddings and cfg.sliding_window is None and cfg.name == "m"
    loaded = dict(ckpt.tensors())
    for name, want in tensors().items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], want.float()), name
    tok = ckpt.tokenizer
    assert tok.encode("Hi")[0] == 1 and tok.encode("Hi", add_special_tokens=False)[0] != 1
    assert tok.eos_token_id == 2 and set(tok.eos_token_ids) == {0, 2} and cfg.eos_token_ids == tok.eos_token_ids
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n"


def test_family_specific_fields(tmp_path, smollm2_tokenizer):
    mistral = {**CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert open_checkpoint(write_dir(tmp_path / "mis", smollm2_tokenizer, mistral)).config.sliding_window == 4096
    qwen = {**CONFIG, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": False,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
    qwen.pop("rope_theta")
    cfg = open_checkpoint(write_dir(tmp_path / "qw", smollm2_tokenizer, qwen)).config
    assert cfg.architecture == "qwen2" and cfg.attention_bias and cfg.sliding_window is None
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None


def test_unsupported_architecture(tmp_path, smollm2_tokenizer):
    path = write_dir(tmp_path / "g", smollm2_tokenizer, {**CONFIG, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        open_checkpoint(path)


def test_missing_shard_and_corrupt_file(tmp_path, smollm2_tokenizer):
    path = write_dir(tmp_path / "s", smollm2_tokenizer, sharded=True)
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(path)
    path = write_dir(tmp_path / "c", smollm2_tokenizer)
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightLoadError, match="corrupt") as exc:
        open_checkpoint(path)
    assert "\n" not in str(exc.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(WeightLoadError, match="no config.json"):
        open_checkpoint(str(tmp_path))
