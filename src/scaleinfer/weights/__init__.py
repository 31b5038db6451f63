"""Checkpoint readers: GGUF and HF safetensors directories -> ModelConfig, tokenizer, HF-named tensors."""
