"""RoPE scaling variants against transformers' reference (ROPE_INIT_FUNCTIONS, LlamaRotaryEmbedding)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from scaleinfer.errors import UnsupportedModelError
from scaleinfer.layers.rotary import RotaryEmbedding, _inv_freq, dynamic_ntk_inv_freq
from scaleinfer.weights.gguf import _rope_scaling

HEAD_DIM, THETA, MAX_POS = 64, 10000.0, 256

CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_legacy_type_key": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_betas_no_truncate": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                               "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                    "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "attention_factor": 1.5},
    "yarn_factor_null": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64},
    "yarn_no_original": {"rope_type": "yarn", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def hf_config(scaling: dict | None) -> LlamaConfig:
    rope = {"rope_theta": THETA, "rope_type": "default", **(scaling or {})}
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    return LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, num_key_value_heads=2, head_dim=HEAD_DIM,
                       intermediate_size=32, num_hidden_layers=1, vocab_size=16, max_position_embeddings=MAX_POS,
                       rope_parameters=rope)


def hf_inv_freq(scaling: dict | None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    config = hf_config(scaling)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)


def hf_cos_sin(scaling: dict | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] of one full forward over positions 0..length-1."""
    rotary = LlamaRotaryEmbedding(hf_config(scaling))
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    return cos[0], sin[0]


def assert_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-6) -> None:
    ours, ref = ours.double(), ref.double()
    assert ours.shape == ref.shape
    err = ((ours - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
    assert err < tol, err


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_attention_factor_match_hf(name):
    scaling = CASES[name]
    ref, ref_factor = hf_inv_freq(scaling)
    ours, factor = _inv_freq(HEAD_DIM, THETA, scaling, MAX_POS)
    assert_rel(ours, ref)
    assert math.isclose(factor, ref_factor, rel_tol=1e-6), (factor, ref_factor)


@pytest.mark.parametrize("seq_len", [1, MAX_POS, MAX_POS + 1, 3 * MAX_POS, 10_000])
def test_dynamic_ntk_inv_freq_matches_hf_full_forward(seq_len):
    ref, _ = hf_inv_freq(CASES["dynamic"], seq_len=seq_len)
    assert_rel(dynamic_ntk_inv_freq(HEAD_DIM, THETA, 2.0, MAX_POS, seq_len), ref)


@pytest.mark.parametrize("name", [n for n in CASES if n != "dynamic"])
def test_table_rows_match_hf_forward(name):
    scaling = CASES[name]
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, THETA, scaling)
    ref_cos, ref_sin = hf_cos_sin(scaling, MAX_POS)
    positions = torch.tensor([0, 1, 7, 63, 64, 200, MAX_POS - 1])
    cos, sin = rope.lookup(positions, torch.float32)
    # HF takes position * inv_freq in float32: the angle is off by ~position * 6e-8.
    torch.testing.assert_close(cos[:, 0], ref_cos[positions], atol=5e-5, rtol=0)
    torch.testing.assert_close(sin[:, 0], ref_sin[positions], atol=5e-5, rtol=0)


def test_dynamic_table_row_p_is_hf_full_forward_of_length_p_plus_1():
    """Documented semantics: row p = the last row of HF's forward over p + 1 tokens."""
    scaling = CASES["dynamic"]
    rope = RotaryEmbedding(HEAD_DIM, MAX_POS, THETA, scaling)
    for p in (0, 5, MAX_POS - 1, MAX_POS, MAX_POS + 37, 2 * MAX_POS + 3):  # past the table: it grows
        cos, sin = rope.lookup(torch.tensor([p]), torch.float32)
        ref_cos, ref_sin = hf_cos_sin(scaling, p + 1)
        torch.testing.assert_close(cos[0, 0], ref_cos[p], atol=1e-4, rtol=0)
        torch.testing.assert_close(sin[0, 0], ref_sin[p], atol=1e-4, rtol=0)
    # Within the original context a long forward is plain RoPE, identical to HF for every row ...
    ref_cos, _ = hf_cos_sin(scaling, MAX_POS)
    torch.testing.assert_close(rope.lookup(torch.arange(MAX_POS), torch.float32)[0][:, 0], ref_cos,
                               atol=5e-5, rtol=0)
    # ... beyond it HF rotates earlier prompt tokens with the base for the whole length; we do not.
    ref_cos, _ = hf_cos_sin(scaling, 2 * MAX_POS)
    ours = rope.lookup(torch.tensor([MAX_POS]), torch.float32)[0][0, 0]
    assert (ours - ref_cos[MAX_POS]).abs().max() > 1e-2


@pytest.mark.parametrize("scaling, fragments", [
    ({"rope_type": "su", "factor": 2.0}, ["'su'", "not supported", "default, linear, dynamic, yarn, llama3"]),
    ({"rope_type": "linear"}, ["'linear'", "'factor'"]),
    ({"rope_type": "dynamic"}, ["'dynamic'", "'factor'"]),
    ({"type": "yarn", "original_max_position_embeddings": 64}, ["'yarn'", "'factor'"]),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, ["'llama3'", "'low_freq_factor'"]),
])
def test_errors_are_one_line_and_name_the_problem(scaling, fragments):
    with pytest.raises(UnsupportedModelError) as exc:
        RotaryEmbedding(HEAD_DIM, MAX_POS, THETA, scaling)
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


class _FakeGGUF:
    path = "m.gguf"

    def __init__(self, metadata: dict):
        self.metadata = metadata

    def get(self, key, default=None):
        return self.metadata.get(key, default)


def test_gguf_yarn_keys():
    meta = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 32768}
    assert _rope_scaling(_FakeGGUF(meta), "llama", {}, HEAD_DIM, THETA) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    meta |= {"llama.rope.scaling.yarn_beta_fast": 16.0, "llama.rope.scaling.yarn_beta_slow": 2.0,
             "llama.rope.scaling.yarn_attn_factor": 1.25}
    assert _rope_scaling(_FakeGGUF(meta), "llama", {}, HEAD_DIM, THETA) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
        "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25}
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    assert _rope_scaling(_FakeGGUF(linear), "llama", {}, HEAD_DIM, THETA) == {"rope_type": "linear", "factor": 2.0}


def test_engine_context_covers_yarn_and_dynamic_extension():
    from scaleinfer.config import ModelConfig
    from scaleinfer.engine.engine import position_limit

    base = dict(architecture="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                num_kv_heads=1, head_dim=8, max_position_embeddings=32768)
    assert position_limit(ModelConfig(**base)) == 32768
    assert position_limit(ModelConfig(**base, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 32768})) == 131072
    assert position_limit(ModelConfig(**base, rope_scaling={"type": "dynamic", "factor": 2.0})) == 65536
    assert position_limit(ModelConfig(**base, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                            "original_max_position_embeddings": 8192})) == 32768
