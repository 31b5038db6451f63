"""Shared by the Whisper parity tests: our checkpoint tensors (fused Q/K/V, fused cross K/V) as an HF
WhisperForConditionalGeneration state dict, and that HF model built from them."""
from __future__ import annotations


def hf_whisper(model_config, tensors):
    """An HF WhisperForConditionalGeneration (eval, fp32) with `tensors` (our checkpoint names) loaded."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg, wc = model_config, model_config.arch_config
    hf_cfg = WhisperConfig(vocab_size=cfg.vocab_size, num_mel_bins=wc.num_mel_bins, encoder_layers=wc.encoder_layers,
                           encoder_attention_heads=wc.encoder_heads, decoder_layers=cfg.num_layers,
                           decoder_attention_heads=cfg.num_heads, d_model=cfg.hidden_size,
                           encoder_ffn_dim=cfg.intermediate_size, decoder_ffn_dim=cfg.intermediate_size,
                           max_source_positions=wc.max_source_positions,
                           max_target_positions=cfg.max_position_embeddings)
    state = {}
    d = cfg.hidden_size
    for name, t in tensors:
        name = name.replace(".mlp.fc", ".fc")
        for fused, parts in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj")), (".kv_proj.", ("k_proj", "v_proj"))):
            if fused in name:
                for part, piece in zip(parts, t.split(d)):
                    if part == "k_proj" and name.endswith("bias"):
                        assert not piece.any()   # Whisper's K has no bias: CTranslate2 stores zeros
                        continue
                    state[name.replace(fused.strip("."), part)] = piece
                break
        else:
            state[name] = t
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    model = WhisperForConditionalGeneration(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model
