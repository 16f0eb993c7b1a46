"""The search objective: geometric mean PPL over several texts, evaluated a batch at a time so a hopeless
trial can stop early."""

from __future__ import annotations

import math

import torch

from engine.control import Control
from engine.measure.nll import next_token_nll


@torch.inference_mode()
def progressive_objective(model, sets: dict[str, torch.Tensor], control: Control, report=None,
                          batch_size: int = 4) -> float:
    """Geometric mean of per-domain PPL, computed a batch of every domain at a time.

    `report(done, value)` gets the running value after each step but the last (`done` batches of every text
    so far: the fidelity a multi-fidelity pruner compares trials at) and returns True to stop (trial pruned).
    """
    device = next(model.parameters()).device
    nll = {k: 0.0 for k in sets}
    count = {k: 0 for k in sets}
    steps = max((v.shape[0] + batch_size - 1) // batch_size for v in sets.values())
    value = float("inf")
    for step in range(steps):
        control.checkpoint()
        for name, windows in sets.items():
            batch = windows[step * batch_size : (step + 1) * batch_size]
            if not batch.shape[0]:
                continue
            x = batch.to(device)
            tokens = next_token_nll(model(input_ids=x).logits, x)
            nll[name] += tokens.sum().item()
            count[name] += tokens.numel()
        mean_log = sum(nll[k] / count[k] for k in sets if count[k]) / sum(1 for k in sets if count[k])
        value = math.exp(min(mean_log, 700))
        # after the last step the value is the whole objective: stopping then would save nothing and lose it
        if report is not None and step + 1 < steps and report(step + 1, value):
            raise Pruned(value, step + 1, steps)
    return value


class Pruned(Exception):
    """Stopped early: `value` is the running objective over the first `done` of `steps` batches, not
    comparable with a whole objective."""

    def __init__(self, value: float, done: int = 0, steps: int = 0) -> None:
        self.value, self.done, self.steps = value, done, steps

