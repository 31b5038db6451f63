"""Offline workflows that write checkpoints: prune (prune.py, importance.py) and distill (distill.py).

Both work on the HF transformers twin of a checkpoint (checkpoints.py: any model `--model` accepts,
GGUF included, opened as HF-named float tensors in an HF model), and both write a plain HF safetensors
directory that loads with `--model DIR` here and with `from_pretrained(DIR)` in HF transformers.
"""
