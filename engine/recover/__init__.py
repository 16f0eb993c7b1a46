"""Recovery: LoRA fine-tuning of a pruned plan, with checkpoints and an exact resume (train)."""
