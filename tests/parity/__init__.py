"""Parity tests against HF transformers and other engines (a package: test files share helpers such as seq2seq_tiny)."""
