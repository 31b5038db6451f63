"""The runner's decode program on tiny random Llama / Qwen2 / Gemma 3 models: it takes the decode-only
steps it covers with logits bit-identical to model.forward, is rebuilt when a quantization method is
swapped, and leaves to model.forward what it does not cover (a family without decode_layers, another
attention backend, prefill); with int8 KV the runner sets the key divisors of Llama-shaped layers only."""
from __future__ import annotations

import pytest
import torch

from scaleinfer.attention.backend import get_backend
from scaleinfer.attention.kv_int8 import key_channel_scale
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.layers.fused import fused_ops
from scaleinfer.models import get_model_class
from scaleinfer.runner.decode_program import DecodePlan
from scaleinfer.runner.model_runner import ModelRunner

needs_kernels = pytest.mark.skipif(fused_ops(torch.zeros(1)) is None, reason="CPU kernels not built (no compiler)")


def _tiny(architecture: str, backend: str = "cpu", **extra) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(architecture=architecture, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                      attention_bias=architecture == "qwen2", **extra)
    model = get_model_class(architecture)(cfg, get_backend(backend))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if "norm" in name else 0.2 * torch.randn(p.shape))
    return model.eval(), cfg


def _runner(model, cfg, kv_cache_dtype="auto") -> ModelRunner:
    return ModelRunner(model, cfg, CacheConfig(block_size=4, kv_cache_dtype=kv_cache_dtype), 8, torch.float32)


def _decode(runner: ModelRunner, lean: bool) -> torch.Tensor:
    """Logits of one decode step after a 5-token prefill (both written to the same blocks each time)."""
    runner.lean_decode = lean
    runner.compute_logits([1, 5, 9, 3, 7], [0, 1])
    return runner.compute_logits([11], [0, 1], num_cached=5)


@needs_kernels
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_runner_takes_the_program_for_a_decode_step_with_identical_logits(architecture, monkeypatch):
    runner = _runner(*_tiny(architecture))
    calls = []
    run = DecodePlan.run
    monkeypatch.setattr(DecodePlan, "run", lambda self, *a: calls.append(1) or run(self, *a))
    lean = _decode(runner, True)
    assert calls == [1]                                   # the prefill went to model.forward, the decode not
    assert runner.decode_plan is not None and runner.decode_plan.program is not None
    assert torch.equal(lean, _decode(runner, False)) and calls == [1]


@needs_kernels
def test_plan_is_rebuilt_when_a_quantization_method_is_swapped():
    from scaleinfer.quantization import apply_quantization

    model, cfg = _tiny("llama")
    runner = _runner(model, cfg)
    _decode(runner, True)
    first = runner.decode_plan
    apply_quantization(model, "int8")
    lean = _decode(runner, True)
    assert runner.decode_plan is not first and runner.decode_plan.methods[0] is model.layers[0].self_attn.qkv_proj.quant_method
    assert torch.equal(lean, _decode(runner, False))


def test_gemma3_and_the_sdpa_int8kv_backend_take_the_module_path():
    gemma = _runner(*_tiny("gemma3", "sdpa-int8kv", sliding_window=4, hidden_activation="gelu_pytorch_tanh"), kv_cache_dtype="int8")
    _decode(gemma, True)
    assert gemma.decode_plan is None and all(k.channel_scale is None for k, _ in gemma.kv_caches)

    model, cfg = _tiny("qwen2", "sdpa-int8kv")   # the backend the engine pairs with int8 KV
    runner = _runner(model, cfg, kv_cache_dtype="int8")
    _decode(runner, True)
    assert runner.decode_plan is None
    for (k_cache, v_cache), layer in zip(runner.kv_caches, model.layers):
        qkv = layer.self_attn.qkv_proj
        start, stop = qkv.shard_bounds()[1]                 # the K shard and its bias
        c = key_channel_scale(qkv.weight[start:stop], qkv.bias[start:stop], layer.input_layernorm.weight, 2, 8)
        assert torch.equal(k_cache.channel_scale, c) and v_cache.channel_scale is None
