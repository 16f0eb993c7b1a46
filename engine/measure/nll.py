"""Next-token loss, the one place it is computed: perplexity, the search objective, window losses, calibration
backward passes. Imports nothing of the engine, so the pruning modules can use it."""

from __future__ import annotations

import contextlib

import torch


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """[batch, len - 1] negative log-likelihood of each next token of `ids` under `logits` [batch, len, vocab]
    (in inference mode unless `differentiable`). Scored as one flat [tokens, vocab] matrix: the
    class-in-the-middle layout costs six times as much on a CPU."""
    with contextlib.nullcontext() if differentiable else torch.inference_mode():
        logits = logits[:, :-1].float()
        target = ids[:, 1:]
        flat = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="none")
        return flat.view(target.shape)
