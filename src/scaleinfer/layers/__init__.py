"""Building blocks the model files are made of: linear, embedding, norm, rotary, activation."""
