"""Measurements of a model: next-token loss (nll), perplexity and speed (evaluate), peak memory in a fresh
process (memprobe), zero-shot accuracy through lm-evaluation-harness (zeroshot)."""
