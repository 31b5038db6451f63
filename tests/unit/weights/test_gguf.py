"""GGUF checkpoints: config from metadata, dequantized and un-permuted tensors, one-line errors."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from scaleinfer.errors import UnsupportedModelError, WeightLoadError
from scaleinfer.weights import gguf
from scaleinfer.weights.gguf_file import GGUFFile
from scaleinfer.weights.loader import open_checkpoint

from .tiny_gguf import llama_cpp_permute, write_tiny_gguf


def load(path) -> tuple:
    ckpt = open_checkpoint(str(path))
    return ckpt, dict(ckpt.tensors())


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        assert np.array_equal(gguf.unpermute_qk(llama_cpp_permute(w, heads), heads), w)
    bias = np.arange(64, dtype=np.float32)
    assert np.array_equal(gguf.unpermute_qk(llama_cpp_permute(bias, 4), 4), bias)


def test_f32_llama_round_trip_is_exact(tmp_path):
    hf = write_tiny_gguf(tmp_path / "m.gguf", tied=False)
    ckpt, tensors = load(tmp_path / "m.gguf")
    assert ckpt.format == "gguf" and ckpt.num_tensors == len(hf) == len(tensors)
    for name, want in hf.items():  # q_proj / k_proj come back in HF's rotate-half row order
        assert tensors[name].dtype.is_floating_point and tensors[name].shape == want.shape, name
        assert np.array_equal(tensors[name].numpy(), want), name
    cfg = ckpt.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 2, 64, 128)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (4, 2, 16, 261)
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and cfg.rope_scaling is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (0, 2)  # EOS, then <|im_end|> from the template
    assert ckpt.tokenizer.eos_token_ids == cfg.eos_token_ids


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_tensors_equal_gguf_dequantize(tmp_path, qtype):
    hf = write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype, num_layers=1)
    _, tensors = load(tmp_path / "m.gguf")
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2], 0)
        stored = llama_cpp_permute(hf[name], heads) if heads else hf[name]
        want = quants.dequantize(quants.quantize(stored, qtype), qtype).astype(np.float32)
        want = gguf.unpermute_qk(want, heads) if heads else want
        assert np.array_equal(tensors[name].numpy(), want), name


def test_qwen2_keeps_row_order_and_has_biases(tmp_path):
    hf = write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2", num_layers=1)
    ckpt, tensors = load(tmp_path / "q.gguf")
    assert ckpt.config.architecture == "qwen2" and ckpt.config.attention_bias and ckpt.config.tie_word_embeddings
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias"):
        assert np.array_equal(tensors[f"model.layers.0.{name}"].numpy(), hf[f"model.layers.0.{name}"])


def test_rope_scaling_keys(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", metadata={"llama.rope.scaling.type": "linear",
                                                   "llama.rope.scaling.factor": 4.0,
                                                   "llama.rope.scaling.original_context_length": 64})
    cfg = open_checkpoint(str(tmp_path / "m.gguf")).config
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    want = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    factors = gguf.llama3_rope_factors(want, 16, 10000.0).astype(np.float32)
    assert 1.0 < factors.max() and factors.min() == 1.0  # the tiny head_dim still spans all three regimes
    write_tiny_gguf(tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": factors})
    ckpt = open_checkpoint(str(tmp_path / "m.gguf"))
    assert ckpt.config.rope_scaling == want
    assert "rope_freqs.weight" not in dict(ckpt.tensors())

    write_tiny_gguf(tmp_path / "odd.gguf", extra_tensors={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(UnsupportedModelError) as exc:
        open_checkpoint(str(tmp_path / "odd.gguf"))
    assert_one_line(exc, "rope_freqs")


def test_unknown_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", arch="phi3", num_layers=1)
    with pytest.raises(UnsupportedModelError) as exc:
        open_checkpoint(str(tmp_path / "m.gguf"))
    assert_one_line(exc, "'phi3'", "llama", "qwen2")


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, num_layers=1)
    # Rewrite with the embedding stored as Q8_1, a type gguf.quants cannot dequantize.
    gf = GGUFFile.open(str(path))
    writer = GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    for key, value in gf.metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for info in gf.tensors:
        if info.name == "token_embd.weight":
            rows, cols = info.shape
            writer.add_tensor(info.name, np.zeros((rows, cols // 32 * 40), np.uint8), raw_dtype=Q.Q8_1)
        else:
            writer.add_tensor(info.name, gguf._dequantize(gf, info))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError) as exc:
        open_checkpoint(str(tmp_path / "q81.gguf"))
    assert_one_line(exc, "token_embd.weight", "Q8_1", "Q4_K")


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(WeightLoadError) as exc:
        open_checkpoint(missing)
    assert_one_line(exc, f"model file not found: {missing}", "scaleinfer models")


@pytest.mark.parametrize("keep", [0, 3, 100, 5000])
def test_truncated_header(tmp_path, smollm2_gguf_path, keep):
    """Cut inside the magic, the counts, the metadata, or the vocabulary."""
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        path.write_bytes(f.read(keep))
    with pytest.raises(WeightLoadError) as exc:
        open_checkpoint(str(path))
    assert_one_line(exc, str(path))


def test_truncated_tensor_data(tmp_path, smollm2_gguf_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(os.path.getsize(smollm2_gguf_path) - 4096))
    with pytest.raises(WeightLoadError) as exc:
        open_checkpoint(str(path))
    assert_one_line(exc, "truncated", "re-download")


def test_garbage_and_absurd_counts(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(WeightLoadError) as exc:
        open_checkpoint(str(junk))
    assert_one_line(exc, "not a valid GGUF")
    absurd = tmp_path / "absurd.gguf"  # valid magic and version, then 2**60 metadata entries
    absurd.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1 << 60).to_bytes(8, "little"))
    with pytest.raises(WeightLoadError) as exc:
        open_checkpoint(str(absurd))
    assert_one_line(exc, "more than the file can hold")


def test_directory_with_one_gguf(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", num_layers=1)
    ckpt = open_checkpoint(str(tmp_path))
    assert ckpt.path == str(tmp_path / "m.gguf") and ckpt.format == "gguf"


def test_smollm2_config(smollm2_gguf_path):
    ckpt = open_checkpoint(smollm2_gguf_path)
    cfg = ckpt.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert abs(cfg.rms_norm_eps - 1e-5) < 1e-9
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids[0] == 2
    assert ckpt.num_tensors == 272  # 30 layers x 9 + embedding + final norm


def test_copy_is_independent_of_the_map(tmp_path):
    """Tensors own their memory: writable, and still valid after the file is gone."""
    path = tmp_path / "m.gguf"
    hf = write_tiny_gguf(path, num_layers=1)
    shutil.copy(path, tmp_path / "copy.gguf")
    _, tensors = load(tmp_path / "copy.gguf")
    os.remove(tmp_path / "copy.gguf")
    norm = tensors["model.norm.weight"]
    norm.add_(1.0)
    assert np.allclose(norm.numpy(), hf["model.norm.weight"] + 1.0)
