"""Measurements of a model: perplexity and speed (evaluate), peak memory in a fresh process (memprobe),
zero-shot accuracy through lm-evaluation-harness (zeroshot)."""
