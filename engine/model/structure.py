"""The prunable structures of a LLaMA-family decoder, GQA-aware.

Each decoder layer has attention (q/k/v/o projections) and a gated MLP (gate/up/down). Prunable units:
- a *query head*: its head_dim rows of q_proj and columns of o_proj. In transformers' `repeat_kv` layout the
  query heads served by KV head g are the contiguous block g*r .. (g+1)*r-1 (r = heads per KV head), so
  removing the same number of query heads from every KV group keeps the layout valid.
- a *KV group*: one KV head (its k/v rows) with all r query heads that read it.
- an *MLP channel*: one row of gate_proj and up_proj and the matching column of down_proj.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

from engine.config import PROJ_ATTN, PROJ_MLP
from engine.errors import AdapruneError
from engine.model.spec import SUPPORTED_TEXT, SUPPORTED_TYPES

HeadMode = Literal["query", "kv"]
ATTN, MLP = PROJ_ATTN, PROJ_MLP  # the projections of a decoder layer (one list, in engine.config)


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer (they differ between layers once a model is pruned)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def query_head_params(self) -> int:
        """Parameters one query head holds (q rows, their bias, o columns)."""
        return 2 * self.head_dim * self.hidden + (self.head_dim if self.qkv_bias else 0)

    @property
    def kv_head_params(self) -> int:
        """Parameters one KV head holds alone (k and v rows with biases)."""
        return 2 * (self.head_dim * self.hidden + (self.head_dim if self.qkv_bias else 0))

    def kv_group_params(self, heads_per_group: int | None = None) -> int:
        r = self.heads_per_group if heads_per_group is None else heads_per_group
        return r * self.query_head_params + self.kv_head_params

    @property
    def channel_params(self) -> int:
        return 3 * self.hidden + (2 if self.mlp_bias else 0)

    @property
    def attn_params(self) -> int:
        return self.n_heads * self.query_head_params + self.n_kv_heads * self.kv_head_params + (
            self.hidden if self.o_bias else 0
        )

    @property
    def mlp_params(self) -> int:
        return self.intermediate * self.channel_params + (self.hidden if self.mlp_bias else 0)

    def to_dict(self) -> dict:
        return asdict(self)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise AdapruneError(f"unsupported model {type(model).__name__}: adaprune prunes {SUPPORTED_TEXT}")
    return layers


def check_supported(model: nn.Module) -> None:
    """Refuse anything whose layers are not exactly the structure we know how to slice."""
    model_type = getattr(model.config, "model_type", "?")
    base_type = getattr(model.config, "adaprune_base_model_type", model_type)
    if base_type not in SUPPORTED_TYPES:
        raise AdapruneError(f"unsupported architecture {model_type!r}: adaprune prunes {SUPPORTED_TEXT}")
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(attn, n) for n in ATTN] + [(mlp, n) for n in MLP]
        if any(not isinstance(getattr(m, n, None), nn.Linear) for m, n in names):
            raise AdapruneError(
                f"layer {i} of {type(model).__name__} lacks plain q/k/v/o/gate/up/down Linear modules "
                f"(quantized or custom?): adaprune prunes {SUPPORTED_TEXT}"
            )


def layer_shape(layer: nn.Module) -> LayerShape:
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    n_heads = attn.q_proj.out_features // head_dim
    n_kv = attn.k_proj.out_features // head_dim
    return LayerShape(
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate=mlp.gate_proj.out_features,
        hidden=attn.q_proj.in_features,
        qkv_bias=attn.q_proj.bias is not None,
        o_bias=attn.o_proj.bias is not None,
        mlp_bias=mlp.gate_proj.bias is not None,
    )


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    return [layer_shape(layer) for layer in decoder_layers(model)]


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
