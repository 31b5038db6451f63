"""int8 KV cache on the real default model: the runner sets each layer's key-channel divisors
(attention/kv_int8.py: key_channel_scale) from the weights. (The cache and backend on synthetic
K/V: tests/unit/attention/test_kv_int8.py.)"""
from __future__ import annotations

import pytest
import torch

from scaleinfer.attention.kv_int8 import key_channel_scale


@pytest.mark.slow
def test_engine_sets_key_channel_scales_from_the_weights():
    """The runner sets each layer's key divisor from that layer's K shard of the fused QKV weight and
    its input norm weight; values stay None."""
    from scaleinfer import LLM

    llm = LLM("smollm2-135m-instruct", quantization="none", kv_cache_memory="16MiB", max_model_len=128,
              kv_cache_dtype="int8")
    model, caches = llm.engine.runner.model, llm.engine.runner.kv_caches
    cfg = model.config
    assert len(caches) == len(model.layers)
    for (k_cache, v_cache), layer in zip(caches, model.layers):
        qkv = layer.self_attn.qkv_proj
        start, stop = qkv.shard_bounds()[1]   # the K shard
        c = key_channel_scale(qkv.weight[start:stop], None, layer.input_layernorm.weight, cfg.num_kv_heads,
                              cfg.head_dim)
        assert torch.equal(k_cache.channel_scale, c)
        assert v_cache.channel_scale is None
        assert c.shape == (cfg.num_kv_heads, cfg.head_dim) and bool((c > 0).all())
        assert torch.equal(c[:, :c.shape[1] // 2], c[:, c.shape[1] // 2:])   # equal within RoPE pairs
