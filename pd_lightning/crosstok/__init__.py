"""Cross-tokenizer distillation: bytes per token and bits per byte, alignment of two tokenizations, vocabulary
mapping of sparse teacher targets (issue 20)."""
