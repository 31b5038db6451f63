"""Write tiny GGUF files with gguf.GGUFWriter: random weights, a byte-level vocabulary, llama.cpp's layout."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants
from tokenizers.pre_tokenizers import ByteLevel

BYTE_TOKENS = sorted(ByteLevel.alphabet())  # 256 single-byte tokens in GPT-2's byte alphabet
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGED = ["Ġt", "he"]  # the two merges' results
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF's q_proj / k_proj rows for the llama architecture."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch: str = "llama", qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                    num_layers: int = 2, hidden: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                    ffn: int = 128, tied: bool = True, metadata: dict | None = None,
                    extra_tensors: dict[str, np.ndarray] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a GGUF at `path`; returns the HF-named float32 weights it encodes (before quantization)."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + BYTE_TOKENS + MERGED
    vocab = len(tokens)
    head_dim = hidden // num_heads
    writer = GGUFWriter(str(path), arch)
    for key, value in {"block_count": num_layers, "context_length": 256, "embedding_length": hidden,
                       "feed_forward_length": ffn, "attention.head_count": num_heads,
                       "attention.head_count_kv": num_kv_heads}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("general.name", "tiny")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "gpt-2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_array("tokenizer.ggml.merges", ["Ġ t", "h e"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 0)
    writer.add_string("tokenizer.chat_template", TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)

    hf: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], permute_heads: int = 0, norm: bool = False):
        w = (1.0 + 0.1 * rng.standard_normal(shape) if norm else rng.standard_normal(shape)).astype(np.float32)
        stored = llama_cpp_permute(w, permute_heads) if permute_heads and arch == "llama" else w
        if len(shape) == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, quants.quantize(stored, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, stored)
        hf[hf_name] = w

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden))
    for i in range(num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (hidden,), norm=True)
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (num_heads * head_dim, hidden), num_heads)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (num_kv_heads * head_dim, hidden), num_kv_heads)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (num_kv_heads * head_dim, hidden))
        if arch == "qwen2":
            add(b + "attn_q.bias", p + "self_attn.q_proj.bias", (num_heads * head_dim,))
            add(b + "attn_k.bias", p + "self_attn.k_proj.bias", (num_kv_heads * head_dim,))
            add(b + "attn_v.bias", p + "self_attn.v_proj.bias", (num_kv_heads * head_dim,))
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (hidden, num_heads * head_dim))
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (hidden,), norm=True)
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (ffn, hidden))
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (ffn, hidden))
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (hidden, ffn))
    add("output_norm.weight", "model.norm.weight", (hidden,), norm=True)
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, hidden))
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf
