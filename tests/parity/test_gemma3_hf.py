"""Gemma 3 parity with HF transformers: a tiny random-weight Gemma 3 through our HF-directory loader
(always), and the real Gemma-3-270m weights (HF dequantizes the same GGUF) when they are installed.

Token ids come from HF's tokenizer (fed to us directly): the comparison is of the models only.
"""
from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402
from scaleinfer.errors import UnsupportedModelError  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
    "北京是中国的首都，也是",
]
SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "data" / "shakespeare-en.txt"
LONG = 700
"""Tokens of the long prompt: past Gemma-3-270m's 512-token window, so the local layers' window matters."""
REAL_TOL = 2e-3
"""Max abs logit difference allowed on the real model, fp32. Measured (CPU, torch 2.13): 4.0e-5 to 1.4e-4
on the short prompts (logits up to 22-98 in magnitude) and 1.4e-4 on the 700-token one (up to 31), i.e.
~1e-6 relative: what reordered fp32 sums leave (fused QKV / gate-up matmuls, SDPA vs eager softmax,
F.rms_norm vs HF's composite norm, RoPE tables in float64 vs float32) over 18 layers. 2e-3 keeps >10x
headroom for other BLAS builds; real bugs are far above it (all layers causal instead of windowed: 24 on
the rows past 512)."""


# ---- tiny random Gemma 3 (HF directory) -------------------------------------------------------------
def _write_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer.json: the engine needs one to start; the tests feed token ids."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab_size)}
    Backend(WordLevel(vocab, unk_token="<unk>")).save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, f)


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory):
    """A random Gemma 3 (7 layers: 5 sliding, 1 full, 1 sliding; window 8) saved as an HF directory.

    Every weight is random, norms included (HF initialises them to zero, which would hide a wrong
    (1 + w) offset), and query_pre_attn_scalar != head_dim and a biting final soft-cap are set so a
    wrong scale or a missing cap shows."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
        query_pre_attn_scalar=24, final_logit_softcapping=3.0, rms_norm_eps=1e-6)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if name.endswith("norm.weight") else 0.1)
    model.save_pretrained(path)
    _write_tokenizer(str(path), cfg.vocab_size)
    return str(path), model


def test_tiny_random_gemma3_matches_hf(tiny_gemma3_dir):
    path, hf_model = tiny_gemma3_dir
    llm = LLM(path, quantization="none", kv_cache_memory="16MiB", max_model_len=256, max_num_batched_tokens=16,
              kv_cache_dtype="float32")
    mc = llm.engine.model_config
    assert mc.architecture == "gemma3" and mc.sliding_window == 8
    assert mc.layer_types == tuple(hf_model.config.layer_types)
    assert (mc.rope_theta, mc.rope_local_theta, mc.query_pre_attn_scalar) == (1e6, 1e4, 24.0)
    g = torch.Generator().manual_seed(1)
    for n in (5, 40):  # 40 tokens: 5x the window
        ids = torch.randint(4, 512, (n,), generator=g).tolist()
        ours = llm.engine.compute_logits(ids)
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        diff = (ours - ref).abs().max().item()
        assert diff < 1e-4, f"max abs logit diff {diff} on {n} tokens"
    # Through the scheduler: 16-token chunks, so later chunks read the window from the paged cache.
    ids = torch.randint(4, 512, (40,), generator=g).tolist()
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=16, min_tokens=16))[0]
    with torch.inference_mode():
        ref_ids = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 40, dtype=torch.long),
                                    max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert out.outputs[0].token_ids == ref_ids[0, 40:].tolist()


def test_hf_config_transformers4_format(tmp_path):
    """A transformers 4 style Gemma 3 config (rope_local_base_freq, sliding_window_pattern, no
    layer_types) and a multimodal one (text_config over Gemma3TextConfig's defaults)."""
    from scaleinfer.weights.safetensors import read_model_config

    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
           "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
           "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
           "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
           "final_logit_softcapping": None, "attn_logit_softcapping": None, "eos_token_id": [1, 106]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mc = read_model_config(str(tmp_path))
    assert mc.layer_types.count("full_attention") == 4 and mc.layer_types[5] == "full_attention"
    assert (mc.rope_theta, mc.rope_local_theta, mc.rope_scaling) == (1e6, 1e4, None)
    assert mc.tie_word_embeddings and mc.hidden_activation == "gelu_pytorch_tanh"

    mm = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
          "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                          "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                          "sliding_window": 1024}}
    (tmp_path / "config.json").write_text(json.dumps(mm))
    mc = read_model_config(str(tmp_path))
    assert (mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.sliding_window) == (34, 8, 4, 256, 1024)
    assert mc.rope_scaling == {"factor": 8.0, "rope_type": "linear"} and mc.eos_token_ids == (1, 106)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "attn_logit_softcapping": 50.0}))
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        read_model_config(str(tmp_path))


# ---- the real Gemma-3-270m --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    from scaleinfer import catalog

    if not catalog.CATALOG["gemma-3-270m"].installed:
        pytest.skip("gemma-3-270m is not installed (scaleinfer pull gemma-3-270m)")
    path = catalog.resolve("gemma-3-270m")
    name_dir, name = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(name_dir, gguf_file=name)
    llm = LLM(path, quantization="none", max_model_len=1024, kv_cache_memory="128MiB", kv_cache_dtype="float32")  # our own tokenizer, from the GGUF
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(name_dir, gguf_file=name, dtype=torch.float32)
    return llm, hf_model.eval(), tok


def _long_ids(tok) -> list[int]:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000]
    ids = tok(text)["input_ids"]
    assert len(ids) >= LONG
    return ids[:LONG]


@torch.inference_mode()
def test_real_gemma3_logits_match_hf(real):
    llm, hf_model, tok = real
    assert llm.engine.model_config.layer_types == tuple(hf_model.config.layer_types)
    for ids in [tok(p)["input_ids"] for p in PROMPTS] + [_long_ids(tok)]:
        ours = llm.engine.compute_logits(ids)
        ref = hf_model(torch.tensor([ids])).logits[0].float()
        diff = (ours - ref).abs().max().item()
        assert diff < REAL_TOL, f"max abs logit diff {diff} (logit scale {ref.abs().max().item():.1f}) " \
                                f"on {len(ids)} tokens"


@torch.inference_mode()
def test_real_gemma3_greedy_matches_hf(real):
    llm, hf_model, tok = real
    # The long prompt goes through chunked prefill (512-token steps) and decodes past the window.
    for ids in [tok(PROMPTS[0])["input_ids"], tok(PROMPTS[2])["input_ids"], _long_ids(tok)]:
        # min_tokens bans EOS exactly like HF's min_new_tokens, so both see the same distribution.
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))[0]
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), f"{len(ids)}-token prompt"


def test_real_gemma3_text_in_text_out_matches_hf(real):
    """Our GGUF tokenizer end to end: the prompt's ids, the greedy ids and the decoded text equal HF's
    (French and Chinese prompts; the decoded text must hold no broken characters)."""
    llm, hf_model, tok = real
    for prompt in ("La capitale de la France est", "中国的首都是"):
        assert llm.tokenizer.encode(prompt) == tok(prompt)["input_ids"]
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, min_tokens=16))[0].outputs[0]
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        assert out.token_ids == ref.tolist()
        assert out.text == tok.decode(ref, skip_special_tokens=True)
        assert out.text.strip() and "\ufffd" not in out.text
