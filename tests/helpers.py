"""Shared test helpers: random plans and the zero-instead-of-remove reference."""

from __future__ import annotations

import copy
import random

import torch

from engine.model.structure import decoder_layers, layer_shapes
from engine.prune.importance import LayerScores
from engine.prune.plan import LayerPlan, select


def random_plan(model, head_mode: str, seed: int = 0, layer_ids=None) -> list[LayerPlan]:
    rnd = random.Random(seed)
    shapes = layer_shapes(model)
    layer_ids = range(len(shapes)) if layer_ids is None else layer_ids
    g = torch.Generator().manual_seed(seed)
    scores, counts = {}, {}
    for i in layer_ids:
        s = shapes[i]
        scores[i] = LayerScores(torch.rand(s.n_heads, generator=g), torch.rand(s.n_kv_heads, generator=g),
                                torch.rand(s.intermediate, generator=g))
        k_max = s.n_kv_heads - 1 if head_mode == "kv" else s.heads_per_group - 1
        counts[i] = (rnd.randint(0, k_max), rnd.randint(0, s.intermediate - 1))
    return select(shapes, scores, counts, head_mode)


@torch.no_grad()
def zeroed_copy(model, plan_layers: list[LayerPlan]):
    """The dense model with the planned-away structures zeroed instead of removed."""
    ref = copy.deepcopy(model)
    for layer, lp in zip(decoder_layers(ref), plan_layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        hd = attn.head_dim
        n_heads = attn.q_proj.out_features // hd
        for h in set(range(n_heads)) - set(lp.keep_heads):
            attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
        for c in set(range(mlp.down_proj.in_features)) - set(lp.keep_channels):
            mlp.down_proj.weight[:, c] = 0
    return ref


def hidden_error(dense, model, windows) -> float:
    """Mean squared difference of the last hidden states of two models on `windows`."""
    with torch.no_grad():
        a = dense(input_ids=windows, output_hidden_states=True).hidden_states[-1]
        b = model(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    return float((a - b).pow(2).mean())
