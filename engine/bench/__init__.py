"""Benchmarks of a session: dense against pruned rows, zero-shot, PPL, speed and memory (run)."""
