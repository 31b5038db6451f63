"""Our GGUF loader against HF transformers loading the same file: identical config and tensors.

HF dequantizes with the same `gguf` package and un-permutes Q/K the same way, so every tensor must
match exactly (this is what proves the llama Q/K un-permute and the [out, in] layout)."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import catalog  # noqa: E402
from scaleinfer.weights.loader import open_checkpoint  # noqa: E402

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    name = request.param
    if not catalog.get_entry(name).installed:
        pytest.skip(f"{name} is not installed (scaleinfer pull {name})")
    ckpt = open_checkpoint(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(ckpt.path), gguf_file=os.path.basename(ckpt.path), dtype=torch.float32)
    yield ckpt, hf.config, hf.state_dict()
    del hf


def test_config_equals_hf(loaded):
    ckpt, hf, _ = loaded
    ours = ckpt.config
    assert ours.vocab_size == hf.vocab_size and ours.hidden_size == hf.hidden_size
    assert ours.intermediate_size == hf.intermediate_size and ours.num_layers == hf.num_hidden_layers
    assert ours.num_heads == hf.num_attention_heads and ours.num_kv_heads == hf.num_key_value_heads
    assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert ours.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    assert ours.bos_token_id == hf.bos_token_id and hf.eos_token_id in ours.eos_token_ids


def test_every_tensor_equals_hf(loaded):
    ckpt, _, state = loaded
    names = []
    for name, tensor in ckpt.tensors():
        names.append(name)
        assert name in state, f"{name} is not an HF parameter name"
        assert tensor.dtype == torch.float32 and tensor.shape == state[name].shape, name
        assert torch.equal(tensor, state[name]), f"{name} differs from HF (max abs diff " \
                                                  f"{(tensor - state[name]).abs().max().item():.3g})"
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"} <= set(names)
    expected = {k for k in state if not k.endswith("rotary_emb.inv_freq")}
    if ckpt.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    assert set(names) == expected
