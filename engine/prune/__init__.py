"""Pruning: importance scores (importance, gradsums), how many heads and channels each layer keeps (plan),
cutting the tensors (slicing), repairing the kept weights (reconstruct), and one recipe end to end (recipe)."""
