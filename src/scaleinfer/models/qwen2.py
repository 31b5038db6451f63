"""Qwen2 / Qwen2.5: the Llama architecture with biases on the Q/K/V projections.

Reference: HF transformers `modeling_qwen2.py`. The bias is switched on by ModelConfig.attention_bias,
which the Qwen2 config readers set, so the layers are Llama's.
"""
from __future__ import annotations

import torch

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.config import ModelConfig
from scaleinfer.errors import ConfigError
from scaleinfer.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32):
        if not cfg.attention_bias:
            raise ConfigError("Qwen2 checkpoints carry Q/K/V biases; the config reader must set attention_bias")
        super().__init__(cfg, backend, dtype)
