"""The protocol every encoder-decoder family implements (Whisper, T5, BART, Marian), so the engine runs
them through the same scheduler, block manager, paged KV cache, sampler and detokenizer as decoder-only
models, without knowing which family it runs.

A request of an encoder-decoder model has two inputs: the *encoder input* (Whisper: log-mel features
[n_mels, frames]; T5 / BART / Marian: source token ids [n]) and the *decoder prompt* (ordinary
`Request.prompt_token_ids`: Whisper's <|startoftranscript|> sequence, T5's [decoder_start_token_id]).
Its life in the engine:

    admit   the block manager gives it cross blocks (ceil(num_encoder_tokens / block_size), from the same
            pool as every KV block) beside its self-attention blocks; SchedulerOutput.encoder_requests
            lists it (encoder tokens count against their own per-step budget of max_num_batched_tokens,
            the first encoder of a step always fits)
    encode  the runner calls model.encode() once for all of the step's encoder requests (batched), then
            model.cross_kv() on the states and stores each decoder layer's cross K/V into that layer's
            paged (K, V) cache at the request's cross slots (attention/cross.py: store_cross_kv) -- once
    decode  every step, model.forward() gets the self-attention metadata (as a decoder-only model does:
            positions 0.. of the decoder tokens, request.block_ids) and `cross_meta`, the metadata each
            decoder query reads its request's cross K/V through (attention/cross.py:
            build_cross_metadata; slot_mapping empty: nothing is written by cross-attention)
    finish  BlockManager.free releases the cross blocks with the self-attention blocks (and so does a
            preemption, after which the encoder runs again: recompute-style, like the prompt)

Cross K/V layout in the paged cache: there is ONE (K, V) pair of flat slot arrays per decoder layer,
[num_blocks * block_size, num_kv_heads, head_dim] as for decoder-only models (kv_cache/cache_tensors.py);
layer i's cross-attention K/V live in layer i's arrays, in the blocks of `request.cross_block_ids`
(encoder position j at slot cross_block_ids[j // block_size] * block_size + j % block_size), its
self-attention K/V in the blocks of `request.block_ids`. So cross and self attention of a layer must
share num_kv_heads and head_dim (true of all four families), and a block is only ever one or the other.
Cross blocks are reference-counted blocks like any other: beams of one request share them by reference
(BlockManager.fork-style ref-count increments), never by copy. Prefix caching is off for requests with
an encoder input (a decoder prefix's K/V depend on the encoder states through cross-attention).

Decoder positions are the decoder tokens' own (0 for the first decoder prompt token), never offset by
the encoder length. ModelConfig describes the decoder (num_layers = decoder layers, num_heads /
num_kv_heads / head_dim of its attention, vocab_size, max_position_embeddings = longest decoder
sequence); everything else a family needs (encoder depth, n_mels, relative-attention buckets ...) is its
own frozen dataclass in ModelConfig.arch_config.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from scaleinfer.attention.metadata import AttentionMetadata


@runtime_checkable
class EncoderDecoderLM(Protocol):
    is_encoder_decoder: bool
    """True (a class attribute): the engine takes this model down the encoder-decoder path."""

    def encoder_len(self, encoder_input: torch.Tensor) -> int:
        """How many encoder states (= cross-attention keys) `encoder_input` yields (Whisper: frames // 2,
        i.e. 1500 for a 30 s window; T5: the token count). Raises errors.RequestError with a one-line
        message if the input has the wrong shape, dtype or length for this model."""
        ...

    def decoder_prompt_ids(self) -> list[int]:
        """The decoder prompt of a request that brings none (T5: [decoder_start_token_id]; BART:
        [decoder_start_token_id]; Whisper: [<|startoftranscript|>])."""
        ...

    def encode(self, encoder_inputs: list[torch.Tensor]) -> torch.Tensor:
        """Run the encoder over several requests' inputs at once (batched as the family can: padded,
        or stacked when all are the same length). Returns the encoder states of all of them, flat
        and in order: [sum(encoder_len(x) for x in encoder_inputs), hidden_size]."""
        ...

    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, in order: the cross-attention (K, V) of the flat `encoder_states`
        ([n, hidden]), each [n, num_kv_heads, head_dim] in the compute dtype. The runner stores them into
        the paged cache (the storage dtype and int8 quantization are the cache's business, not the model's)."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,           # [num_tokens] decoder tokens of the step, flat
        positions: torch.Tensor,           # [num_tokens] their decoder positions
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],   # one (K, V) per decoder layer (self + cross)
        meta: AttentionMetadata,           # self-attention: writes the step's K/V, causal reads
        logits_indices: torch.Tensor,      # [num_logits] rows of the flat batch that need logits
        cross_meta: AttentionMetadata,     # cross-attention reads (attention/cross.py), nothing written
    ) -> torch.Tensor: ...                 # [num_logits, vocab_size] float32


def is_encoder_decoder(model: object) -> bool:
    """Whether `model` takes the encoder-decoder path (implements EncoderDecoderLM)."""
    return isinstance(model, EncoderDecoderLM)
