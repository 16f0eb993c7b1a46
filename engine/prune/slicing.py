"""Physical pruning: replace projections by smaller ones holding the kept rows and columns."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from engine.errors import AdapruneError
from engine.model.structure import decoder_layers, layer_shape
from engine.prune.plan import LayerPlan


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            b = lin.bias.detach()
            new.bias.copy_(b.index_select(0, rows.to(b.device)) if rows is not None else b)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` to prune: new modules and Parameter objects (requires_grad, .grad are its own), but the
    weights and buffers share the original's memory. Slicing and the repair put new, smaller tensors in place of
    the projections they change and never write into the old ones, so a trial holds what it changes, not a
    second model. Not for anything that writes weights in place (merging a LoRA adapter)."""
    memo: dict[int, object] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        memo[id(t)] = nn.Parameter(t.detach(), t.requires_grad) if isinstance(t, nn.Parameter) else t
    return copy.deepcopy(model, memo)


def head_rows(indices: Sequence[int], block: int) -> torch.Tensor:
    return torch.tensor([i * block + j for i in indices for j in range(block)], dtype=torch.long)


def check_layer_plan(layer_id: int, lp: LayerPlan, n_heads: int, n_kv: int, intermediate: int) -> None:
    """GQA: every kept KV head must keep the same number (>= 1) of its own query heads."""
    r = n_heads // n_kv
    if not lp.keep_kv or not lp.keep_heads or not lp.keep_channels:
        raise AdapruneError(f"layer {layer_id}: a plan must keep at least one KV head, query head and channel")
    if sorted(set(lp.keep_heads)) != lp.keep_heads or not set(lp.keep_heads) <= set(range(n_heads)):
        raise AdapruneError(f"layer {layer_id}: kept query heads must be distinct, ascending, < {n_heads}")
    if sorted(set(lp.keep_kv)) != lp.keep_kv or not set(lp.keep_kv) <= set(range(n_kv)):
        raise AdapruneError(f"layer {layer_id}: kept KV heads must be distinct, ascending, < {n_kv}")
    if sorted(set(lp.keep_channels)) != lp.keep_channels or lp.keep_channels[-1] >= intermediate:
        raise AdapruneError(f"layer {layer_id}: kept channels must be distinct, ascending, < {intermediate}")
    per_group = [sum(1 for h in lp.keep_heads if h // r == g) for g in lp.keep_kv]
    if any(h // r not in lp.keep_kv for h in lp.keep_heads) or len(set(per_group)) != 1:
        raise AdapruneError(
            f"layer {layer_id}: with grouped-query attention every kept KV head needs the same number of its "
            f"own query heads (heads {r}*g..{r}*g+{r - 1} read KV head g); this plan keeps {per_group}"
        )


@torch.no_grad()
def apply_plan(model: nn.Module, plan_layers: Sequence[LayerPlan]) -> None:
    """Slice every layer to its plan in place, then describe the new widths in the config."""
    layers = decoder_layers(model)
    if len(plan_layers) != len(layers):
        raise AdapruneError(f"the plan has {len(plan_layers)} layers but the model has {len(layers)}")
    for i, (layer, lp) in enumerate(zip(layers, plan_layers, strict=True)):
        s = layer_shape(layer)
        check_layer_plan(i, lp, s.n_heads, s.n_kv_heads, s.intermediate)
        attn, mlp = layer.self_attn, layer.mlp
        if len(lp.keep_heads) != s.n_heads or len(lp.keep_kv) != s.n_kv_heads:
            q = head_rows(lp.keep_heads, s.head_dim)
            kv = head_rows(lp.keep_kv, s.head_dim)
            attn.q_proj = _sliced(attn.q_proj, rows=q)
            attn.k_proj = _sliced(attn.k_proj, rows=kv)
            attn.v_proj = _sliced(attn.v_proj, rows=kv)
            attn.o_proj = _sliced(attn.o_proj, cols=q)
            attn.num_key_value_groups = len(lp.keep_heads) // len(lp.keep_kv)
        if len(lp.keep_channels) != s.intermediate:
            ch = torch.tensor(lp.keep_channels, dtype=torch.long)
            mlp.gate_proj = _sliced(mlp.gate_proj, rows=ch)
            mlp.up_proj = _sliced(mlp.up_proj, rows=ch)
            mlp.down_proj = _sliced(mlp.down_proj, cols=ch)
    describe_widths(model)


def layer_widths(model: nn.Module) -> list[dict]:
    """Per layer: the widths and which projections have a bias (a repaired layer gains some)."""
    out = []
    for layer in decoder_layers(model):
        s = layer_shape(layer)
        out.append({"num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads,
                    "intermediate_size": s.intermediate, "qkv_bias": s.qkv_bias, "o_bias": s.o_bias,
                    "mlp_bias": s.mlp_bias, "down_bias": layer.mlp.down_proj.bias is not None})
    return out


BIAS_KEYS = ("qkv_bias", "o_bias", "mlp_bias", "down_bias")


def _standard_bias(model_type: str, flags: tuple[bool, ...]) -> dict | None:
    """The config fields of the base family that give every layer these biases, or None if it cannot."""
    qkv, o, gate_up, down = flags
    if model_type == "llama":
        return {"attention_bias": qkv, "mlp_bias": gate_up} if qkv == o and gate_up == down else None
    if model_type == "qwen2":  # q/k/v biases always, none elsewhere
        return {} if flags == (True, False, False, False) else None
    return {} if not any(flags) else None  # mistral: no biases


def describe_widths(model: nn.Module) -> None:
    """Uniform widths (and biases the family's config can express) go into the standard config fields;
    anything else into `adaprune_layers`."""
    cfg = model.config
    widths = layer_widths(model)
    cfg.head_dim = layer_shape(decoder_layers(model)[0]).head_dim  # explicit: heads * head_dim != hidden now
    base = getattr(cfg, "adaprune_base_model_type", cfg.model_type)
    bias = _standard_bias(base, tuple(widths[0][k] for k in BIAS_KEYS))
    dims = {k: v for k, v in widths[0].items() if k not in BIAS_KEYS}
    if all(w == widths[0] for w in widths) and bias is not None and _valid_standard(cfg, {**dims, **bias}):
        for k, v in {**dims, **bias}.items():
            setattr(cfg, k, v)
        if hasattr(cfg, "adaprune_layers"):
            del cfg.adaprune_layers
        return
    cfg.adaprune_layers = widths
    if not _valid_standard(cfg, {}):
        # the standard fields only size the skeleton that per-layer loading shrinks: make them valid
        n = cfg.hidden_size // cfg.head_dim
        cfg.num_attention_heads = n
        cfg.num_key_value_heads = cfg.num_key_value_heads if n % cfg.num_key_value_heads == 0 else n


def _valid_standard(cfg, widths: dict[str, int]) -> bool:
    """Would transformers' config class accept these widths? (LlamaConfig demands heads | hidden size.)"""
    data = {**cfg.to_dict(), **widths}
    data.pop("adaprune_layers", None)
    data.pop("model_type", None)
    try:
        type(cfg)(**data)
    except Exception:
        return False
    return True


def shrink_empty(layer, dims):
    """Give a freshly built layer the widths of a pruned one (weights are loaded afterwards).

    Exports copy this function's source into their modeling file: it may use only `nn`.
    """
    attn, mlp = layer.self_attn, layer.mlp
    hd, hidden = attn.head_dim, attn.q_proj.in_features
    nh, nkv, ni = dims["num_attention_heads"], dims["num_key_value_heads"], dims["intermediate_size"]
    kw = {"device": attn.q_proj.weight.device, "dtype": attn.q_proj.weight.dtype}
    # which projections have a bias: per layer in the dims (a repaired layer gains some), else as built
    qkv_bias = dims.get("qkv_bias", attn.q_proj.bias is not None)
    o_bias = dims.get("o_bias", attn.o_proj.bias is not None)
    bias = dims.get("mlp_bias", mlp.gate_proj.bias is not None)
    down_bias = dims.get("down_bias", mlp.down_proj.bias is not None)
    attn.q_proj = nn.Linear(hidden, nh * hd, bias=qkv_bias, **kw)
    attn.k_proj = nn.Linear(hidden, nkv * hd, bias=qkv_bias, **kw)
    attn.v_proj = nn.Linear(hidden, nkv * hd, bias=qkv_bias, **kw)
    attn.o_proj = nn.Linear(nh * hd, hidden, bias=o_bias, **kw)
    attn.num_key_value_groups = nh // nkv
    mlp.gate_proj = nn.Linear(hidden, ni, bias=bias, **kw)
    mlp.up_proj = nn.Linear(hidden, ni, bias=bias, **kw)
    mlp.down_proj = nn.Linear(ni, hidden, bias=down_bias, **kw)
