"""The engine on CUDA equals HF transformers on the same weights (skipped without a GPU).

Self-contained (a random-weight model written here, a made-up tokenizer from cuda_models.py), so it runs on a
GPU machine that holds none of the catalog's models."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402
from tests.kernel_tests.cuda_models import write_wordlevel_tokenizer  # noqa: E402

VOCAB = 2048


def _model_dir(path) -> "transformers.LlamaForCausalLM":
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    write_wordlevel_tokenizer(path, VOCAB)
    return hf


@pytest.fixture
def cpu_kernel_requests(monkeypatch):
    """Every request for the CPU kernels while the test runs (cpu_kernels() swallows errors into a warning,
    so a raise would not fail the test; the caches are emptied so an earlier load cannot hide one)."""
    import scaleinfer.kernels.loader as loader
    from scaleinfer.layers import fused

    asked: list[str] = []
    monkeypatch.setattr(loader, "prebuilt_kernels", lambda *a, **k: asked.append("prebuilt"))
    monkeypatch.setattr(loader, "jit_kernels", lambda *a, **k: asked.append("jit"))
    loader.cpu_kernels.cache_clear()
    fused._ops.cache_clear()
    yield asked
    loader.cpu_kernels.cache_clear()
    fused._ops.cache_clear()


def test_cuda_fp32_matches_hf(tmp_path, cpu_kernel_requests):
    hf = _model_dir(tmp_path).cuda()
    llm = LLM(str(tmp_path), device="cuda", kv_cache_memory="256MiB", max_model_len=512)
    assert cpu_kernel_requests == [], "a model on the GPU asked for the CPU kernels (a compile on a GPU machine)"
    ids = list(range(100, 300))
    with torch.inference_mode():
        ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    assert (llm.engine.compute_logits(ids) - ref).abs().max().item() < 1e-3
    out = llm.generate([ids[:16]], SamplingParams(temperature=0, max_tokens=16, min_tokens=16))[0]
    with torch.inference_mode():
        ref_ids = hf.generate(torch.tensor([ids[:16]], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                              do_sample=False)[0, 16:].tolist()
    assert out.outputs[0].token_ids == ref_ids


def test_more_ranks_than_gpus_is_a_config_error(tmp_path):
    from scaleinfer.errors import ConfigError

    _model_dir(tmp_path)
    ranks = torch.cuda.device_count() + 1
    with pytest.raises(ConfigError, match=f"{ranks} ranks on this host need {ranks} GPUs"):
        LLM(str(tmp_path), device="cuda", tensor_parallel_size=ranks, kv_cache_memory="64MiB", max_model_len=128)
    with pytest.raises(ConfigError, match="this host has"):
        LLM(str(tmp_path), device=f"cuda:{torch.cuda.device_count()}", kv_cache_memory="64MiB", max_model_len=128)
