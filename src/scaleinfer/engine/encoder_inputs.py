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
