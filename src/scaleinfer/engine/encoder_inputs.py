"""An encoder-decoder request's two inputs (models/encoder_decoder.py), from what add_request was given.

    add_request(id, prompt, params, encoder_input=x)   x feeds the encoder; `prompt` (text, ids, or
                                                       None / "" for the model's default) is the decoder prompt
    add_request(id, "text", params)                    text-to-text (T5, BART, Marian): the prompt's tokens
                                                       feed the encoder, the decoder starts from the default
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.errors import RequestError
from scaleinfer.models.encoder_decoder import is_encoder_decoder


@dataclass
class EncoderDecoderInputs:
    prompt_text: str | None
    decoder_ids: list[int]
    encoder_input: torch.Tensor
    num_encoder_tokens: int


def encoder_decoder_inputs(model, tokenizer, prompt: str | list[int] | None,
                           encoder_input: torch.Tensor | None) -> EncoderDecoderInputs:
    if encoder_input is None:
        if prompt is None or len(prompt) == 0:
            raise RequestError("the prompt is empty; send the text (or token ids) the encoder should read")
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        encoder_input = torch.tensor(ids, dtype=torch.long)
        text, decoder_ids = (prompt if isinstance(prompt, str) else None), model.decoder_prompt_ids()
    elif prompt is None or len(prompt) == 0:
        text, decoder_ids = None, model.decoder_prompt_ids()
    elif isinstance(prompt, str):
        text, decoder_ids = prompt, tokenizer.encode(prompt, add_special_tokens=False)
    else:
        text, decoder_ids = None, list(prompt)
    if not isinstance(encoder_input, torch.Tensor):
        raise RequestError(f"encoder_input must be a torch.Tensor, got {type(encoder_input).__name__}")
    return EncoderDecoderInputs(text, decoder_ids, encoder_input, model.encoder_len(encoder_input))


def request_inputs(model, architecture: str, tokenizer, prompt: str | list[int] | None,
                   encoder_input: torch.Tensor | None) -> tuple[str | None, list[int], torch.Tensor | None, int]:
    """(prompt text, decoder prompt ids, encoder input, encoder tokens) of what add_request was given, for a
    decoder-only model (no encoder input allowed) or an encoder-decoder."""
    if is_encoder_decoder(model):
        enc = encoder_decoder_inputs(model, tokenizer, prompt, encoder_input)
        return enc.prompt_text, enc.decoder_ids, enc.encoder_input, enc.num_encoder_tokens
    if encoder_input is not None:
        raise RequestError(f"{architecture} is a decoder-only model: it takes no encoder input")
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt), None, 0
    return None, list(prompt or []), None, 0
