"""Shared by the Whisper parity tests: an HF WhisperForConditionalGeneration with our checkpoint's weights."""
from __future__ import annotations


def hf_whisper(model_config, tensors):
    """An HF WhisperForConditionalGeneration (eval, fp32) with `tensors` (our checkpoint names) loaded."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from scaleinfer.weights.ct2_whisper import hf_config_kwargs, hf_state_dict

    model = WhisperForConditionalGeneration(WhisperConfig(**hf_config_kwargs(model_config))).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(tensors, model_config.hidden_size), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model
