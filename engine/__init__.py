"""adaprune engine: structured pruning of LLaMA-family causal LMs.

Pure Python + torch/transformers; never imports a UI library. The small public face is `engine.api`.
"""

from engine.errors import AdapruneError, Cancelled

__all__ = ["AdapruneError", "Cancelled"]
