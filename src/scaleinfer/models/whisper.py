"""Whisper (Radford et al. 2022): a speech encoder (two convolutions, sinusoidal positions, pre-norm
Transformer layers) and a text decoder (learned positions, self-attention in the paged cache,
cross-attention over the encoder states, GELU MLP), LayerNorm throughout, LM head tied to the embedding.

Implements models/encoder_decoder.py (EncoderDecoderLM). The encoder runs once per request on a 30 s
window ([n_mels, 3000] log-mel frames -> 1500 states), batched across requests with plain SDPA (it
attends bidirectionally and keeps nothing); each decoder layer's cross K/V are computed once from the
states (cross_kv) and read from the paged cache afterwards. Q/K/V of self-attention are one fused
matmul (K has no bias in Whisper: its slice of the fused bias is zero), cross-attention K/V another.
Reference: HF transformers `modeling_whisper.py` (the parity oracle), openai/whisper `model.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.cross import CrossAttention
from scaleinfer.attention.layer import Attention
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.config import ModelConfig
from scaleinfer.errors import RequestError
from scaleinfer.layers.linear import Linear

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
CHUNK_SECONDS = 30
N_FRAMES = CHUNK_SECONDS * SAMPLE_RATE // HOP_LENGTH   # 3000 mel frames in a window


@dataclass(frozen=True)
class WhisperConfig:
    """What ModelConfig (the decoder's dims) does not say about a Whisper model (ModelConfig.arch_config)."""

    num_mel_bins: int
    encoder_layers: int
    encoder_heads: int
    max_source_positions: int          # encoder states of a 30 s window (1500)
    suppress_ids: tuple[int, ...] = ()
    """Tokens never sampled (openai-whisper's suppress_tokens "-1": symbols, speaker tags ...)."""
    suppress_ids_begin: tuple[int, ...] = ()
    """Tokens not sampled as the first text token (space, <|endoftext|>)."""
    lang_ids: tuple[int, ...] = ()
    """The language tokens (<|en|> ...), in the model's order."""


class WhisperMLP(nn.Module):
    def __init__(self, d: int, ffn: int, dtype: torch.dtype):
        super().__init__()
        self.fc1 = Linear(d, ffn, True, dtype)
        self.fc2 = Linear(ffn, d, True, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _layer_norm(d: int, dtype: torch.dtype) -> nn.LayerNorm:
    norm = nn.LayerNorm(d, eps=1e-5, dtype=dtype)
    norm.requires_grad_(False)
    return norm


class WhisperEncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dtype: torch.dtype):
        super().__init__()
        self.heads = heads
        self.self_attn_layer_norm = _layer_norm(d, dtype)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = Linear(d, 3 * d, True, dtype)
        self.self_attn.out_proj = Linear(d, d, True, dtype)
        self.final_layer_norm = _layer_norm(d, dtype)
        self.mlp = WhisperMLP(d, ffn, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, frames, d]."""
        b, t, d = x.shape
        qkv = self.self_attn.qkv_proj(self.self_attn_layer_norm(x))
        q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)   # [b, h, t, hd] each
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.self_attn.out_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.final_layer_norm(x))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, wc: WhisperConfig, dtype: torch.dtype):
        super().__init__()
        d = cfg.hidden_size
        self.conv1 = nn.Conv1d(wc.num_mel_bins, d, 3, padding=1, dtype=dtype)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1, dtype=dtype)
        self.embed_positions = nn.Embedding(wc.max_source_positions, d, dtype=dtype)
        self.layers = nn.ModuleList(WhisperEncoderLayer(d, wc.encoder_heads, cfg.intermediate_size, dtype)
                                    for _ in range(wc.encoder_layers))
        self.layer_norm = _layer_norm(d, dtype)
        self.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[batch, n_mels, 2 * positions] log-mel -> [batch, positions, d]."""
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[:x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.heads, self.head_dim = h, hd
        self.self_attn_layer_norm = _layer_norm(d, dtype)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = Linear(d, 3 * h * hd, True, dtype)
        self.self_attn.out_proj = Linear(h * hd, d, True, dtype)
        self.self_attn.attn = Attention(h, h, hd, hd ** -0.5, backend)
        self.encoder_attn_layer_norm = _layer_norm(d, dtype)
        self.encoder_attn = nn.Module()
        self.encoder_attn.q_proj = Linear(d, h * hd, True, dtype)
        self.encoder_attn.kv_proj = Linear(d, 2 * h * hd, True, dtype)
        self.encoder_attn.out_proj = Linear(h * hd, d, True, dtype)
        self.encoder_attn.attn = CrossAttention(h, h, hd, hd ** -0.5, backend)
        self.final_layer_norm = _layer_norm(d, dtype)
        self.mlp = WhisperMLP(d, cfg.intermediate_size, dtype)

    def forward(self, x, kv_cache, meta: AttentionMetadata, cross_meta: AttentionMetadata) -> torch.Tensor:
        n, h, hd = x.shape[0], self.heads, self.head_dim
        sa = self.self_attn
        q, k, v = sa.qkv_proj(self.self_attn_layer_norm(x)).view(n, 3, h, hd).unbind(1)
        x = x + sa.out_proj(sa.attn(q, k, v, kv_cache, meta).view(n, h * hd))
        ca = self.encoder_attn
        q = ca.q_proj(self.encoder_attn_layer_norm(x)).view(n, h, hd)
        x = x + ca.out_proj(ca.attn(q, kv_cache, cross_meta).view(n, h * hd))
        return x + self.mlp(self.final_layer_norm(x))

    def cross_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.encoder_attn.kv_proj(states).view(states.shape[0], 2, self.heads, self.head_dim).unbind(1)
        return k, v


class WhisperDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d, dtype=dtype)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, d, dtype=dtype)
        self.layers = nn.ModuleList(WhisperDecoderLayer(cfg, backend, dtype) for _ in range(cfg.num_layers))
        self.layer_norm = _layer_norm(d, dtype)
        self.requires_grad_(False)


class WhisperForConditionalGeneration(nn.Module):
    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32):
        super().__init__()
        assert isinstance(cfg.arch_config, WhisperConfig), "a Whisper ModelConfig carries a WhisperConfig"
        self.config, self.whisper = cfg, cfg.arch_config
        self.dtype = dtype
        self.encoder = WhisperEncoder(cfg, cfg.arch_config, dtype)
        self.decoder = WhisperDecoder(cfg, backend, dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        self.lm_head.weight = self.decoder.embed_tokens.weight   # tied (Whisper's proj_out)

    # ---- EncoderDecoderLM ------------------------------------------------------------------------
    def encoder_len(self, encoder_input: torch.Tensor) -> int:
        frames = 2 * self.whisper.max_source_positions
        want = (self.whisper.num_mel_bins, frames)
        if not isinstance(encoder_input, torch.Tensor) or not encoder_input.is_floating_point() \
                or tuple(encoder_input.shape) != want:
            got = tuple(encoder_input.shape) if isinstance(encoder_input, torch.Tensor) else type(encoder_input).__name__
            raise RequestError(f"Whisper takes log-mel features of shape {want} (a 30 s window, padded), got {got}; "
                               f"compute them with scaleinfer.speech.features.log_mel_spectrogram")
        return self.whisper.max_source_positions

    def decoder_prompt_ids(self) -> list[int]:
        return [self.config.bos_token_id]

    @torch.inference_mode()
    def encode(self, encoder_inputs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(encoder_inputs).to(self.dtype)
        return self.encoder(x).reshape(-1, self.config.hidden_size)

    @torch.inference_mode()
    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross_kv(encoder_states) for layer in self.decoder.layers]

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices,
                cross_meta: AttentionMetadata) -> torch.Tensor:
        dec = self.decoder
        x = dec.embed_tokens(input_ids) + dec.embed_positions(positions)
        for layer, kv_cache in zip(dec.layers, kv_caches):
            x = layer(x, kv_cache, meta, cross_meta)
        x = dec.layer_norm(x.index_select(0, logits_indices))
        return self.lm_head(x).float()
