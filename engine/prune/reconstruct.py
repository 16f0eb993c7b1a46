"""Layer-wise reconstruction: repair the kept weights of `o_proj` and `down_proj` after slicing.

A sliced layer's kept columns still expect the removed inputs. For each pruned projection with dense weights
W (out x d), input x (d) and kept inputs K, the affine ridge least squares toward the sliced weights

    min  E||W x - W'_K x_K - b||^2 + lam * m * ||W'_K - W[:, K]||^2,   m = mean(diag C[K, K])

has the closed form  W'_K = (W C[:, K] + lam m W[:, K]) (C[K, K] + lam m I)^-1,  b = W mu - W'_K mu_K
(mu, C: the mean and covariance of x). The ridge pulls toward the sliced weights, not toward zero (which
over-fits the calibration domain); lam -> inf gives the sliced weights plus the removed inputs' mean
contribution as a bias (FLAP's compensation), lam -> 0 plain least squares.

Two ways to get the statistics, both exact for what they compute:
- `sequential` (`reconstruct`): the inputs as the pruned model produces them, layers below already pruned and
  repaired. Hidden states are carried one layer at a time; each layer costs one dense forward of that layer
  (the kept heads' and channels' values are columns of the dense layer's, so the pruned outputs follow
  without running the pruned layer).
- `dense` (`dense_moments` + `repair_from_moments`): the dense model's own inputs, computed once and reusable
  by every plan (a search's trials then only solve).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from engine.config import PROJ_ATTN, PROJ_MLP, RECONSTRUCT_CALIB, RECONSTRUCT_LAMBDA, from_dict
from engine.control import Control
from engine.data.text import check_calib
from engine.data.windows import draw_windows
from engine.errors import AdapruneError
from engine.events import Sink, Stage, null_sink
from engine.measure.nll import next_token_nll
from engine.model.structure import decoder_layers, layer_shape, layer_shapes
from engine.prune.importance import WindowNorms
from engine.prune.plan import LayerPlan
from engine.prune.slicing import apply_plan, describe_widths, head_rows

MODES = ("sequential", "dense")
DEFAULT_CALIB, DEFAULT_LAMBDA = RECONSTRUCT_CALIB, RECONSTRUCT_LAMBDA


@dataclass(frozen=True)
class Repair:
    """How a plan's kept weights are repaired (stored in the plan, so any later rebuild repeats it)."""

    calib: str = DEFAULT_CALIB
    lam: float = DEFAULT_LAMBDA
    mode: str = "sequential"
    seed: int = 0
    take: int | None = None  # use the first `take` windows of those `calib` draws (a search shares one draw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Repair:
        return from_dict(cls, dict(data), "reconstruction")


def check_repair(calib: str, lam: float, mode: str = "sequential") -> None:
    if not (isinstance(lam, (int, float)) and lam > 0):
        raise AdapruneError(f"--reconstruct-lambda {lam}: give a positive ridge strength (relative; 1 is typical)")
    if mode not in MODES:
        raise AdapruneError(f"reconstruction mode {mode!r}: choose {' or '.join(MODES)}")
    check_calib(calib, "--reconstruct-calib")


class Moments:
    """Token count, mean and covariance of a layer input, merged batch by batch in float64."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        # sum of centred outer products; empty, a zero broadcast (no d x d memory until the first tokens arrive)
        self.m2 = torch.zeros((), dtype=torch.float64).expand(dim, dim)

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        k = x.shape[0]
        mu = x.mean(0)
        xc = x - mu
        # the outer products in float32 (fast), their sum and the merge in float64 (Chan et al.)
        self._merge(k, mu.double().cpu(), (xc.T @ xc).double().cpu(), own=True)

    def merge(self, other: Moments) -> Moments:
        """Add another set of tokens' moments (exact: those of both sets of tokens together)."""
        self._merge(other.n, other.mean, other.m2, own=False)
        return self

    def _merge(self, k: int, mu: Tensor, m2: Tensor, own: bool) -> None:
        """`own`: m2 is a fresh tensor this object may keep (else it is another's, e.g. a cache's, and copied)."""
        # in place: at an 8B model's MLP width every d x d temporary is 1.6 GiB of float64
        if self.n == 0:
            self.n, self.mean, self.m2 = k, mu.clone(), m2 if own else m2.clone()
            return
        delta = mu - self.mean
        total = self.n + k
        self.m2.add_(m2).addr_(delta, delta, alpha=self.n * k / total)
        self.mean += delta * (k / total)
        self.n = total

    @classmethod
    def of(cls, parts: Sequence[Tensor]) -> Moments:
        """The moments of every token in `parts` (batches of one input), in one product (merging batch by
        batch costs as much again on a CPU)."""
        m = cls(parts[0].shape[-1])
        m.add(torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]))
        return m

    @property
    def cov(self) -> Tensor:
        return self.m2 / max(self.n, 1)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.n": torch.tensor([self.n], dtype=torch.float64), f"{prefix}.mean": self.mean,
                f"{prefix}.m2": self.m2}

    @classmethod
    def from_tensors(cls, data: Mapping[str, Tensor], prefix: str) -> Moments:
        m = cls(data[f"{prefix}.mean"].numel())
        m.n, m.mean, m.m2 = int(data[f"{prefix}.n"][0]), data[f"{prefix}.mean"].double(), data[f"{prefix}.m2"].double()
        return m


def merge_moments(parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Moments keyed as `dense_moments` writes them, of every token of `parts` together."""
    out: dict[str, Tensor] = {}
    for prefix in sorted({k.rsplit(".", 1)[0] for k in parts[0]}):
        m = Moments(parts[0][f"{prefix}.mean"].numel())
        for part in parts:
            m.merge(Moments.from_tensors(part, prefix))
        out.update(m.tensors(prefix))
    return out


def ridge_weights(w: Tensor, bias: Tensor | None, mom: Moments, keep: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """The repaired kept columns and the output bias (float64), for dense weights `w` and input moments."""
    w = w.detach().double().cpu()
    mu = mom.mean
    # no full covariance, identity or sum held beside the moments: each is 1.6 GiB at an 8B model's MLP width
    c_k = mom.m2[:, keep].div_(max(mom.n, 1))
    a = c_k[keep]
    reg = lam * float(a.diagonal().mean().clamp_min(1e-12))
    rhs = (w @ c_k).add_(w[:, keep], alpha=reg)
    del c_k
    a.diagonal().add_(reg)
    new = torch.linalg.solve(a, rhs.T).T  # a is symmetric
    b = w @ mu - new @ mu[keep]
    if bias is not None:
        b = b + bias.detach().double().cpu()
    return new, b


def _with_bias(lin: nn.Linear, weight: Tensor, bias: Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.to(new.weight))
        new.bias.copy_(bias.to(new.bias))
    new.weight.requires_grad_(lin.weight.requires_grad)
    new.bias.requires_grad_(lin.weight.requires_grad)
    return new


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, windows: Tensor, batch_size: int) -> list[tuple[Tensor, dict]]:
    """Per batch: the hidden states entering the first decoder layer and the keyword arguments (rotary
    embeddings, mask, positions) the model passes every layer; the model's own forward builds them."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    out: list[tuple[Tensor, dict]] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        out.append((hidden, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in range(0, windows.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=windows[b : b + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return out


def _o_inputs(attn: nn.Module, a: Tensor, kw: dict) -> Tensor:
    """The input of `attn.o_proj` (every head's output, concatenated) when `attn` reads `a`."""
    seen: list[Tensor] = []
    handle = attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        attn(hidden_states=a, **kw)
    finally:
        handle.remove()
    return seen[0]


def _down_inputs(mlp: nn.Module, m: Tensor) -> Tensor:
    return mlp.act_fn(mlp.gate_proj(m)) * mlp.up_proj(m)


def _cuts(model_layer: nn.Module, dense_layer: nn.Module) -> tuple[bool, bool]:
    s, d = layer_shape(model_layer), layer_shape(dense_layer)
    return s.n_heads < d.n_heads, s.intermediate < d.intermediate


def _repair_layer(layer: nn.Module, dense: nn.Module, lp: LayerPlan, mom_o: Moments | None,
                  mom_d: Moments | None, lam: float) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    if mom_o is not None:
        w, b = ridge_weights(dense.self_attn.o_proj.weight, dense.self_attn.o_proj.bias, mom_o,
                             head_rows(lp.keep_heads, dense.self_attn.head_dim), lam)
        attn.o_proj = _with_bias(attn.o_proj, w, b)
    if mom_d is not None:
        w, b = ridge_weights(dense.mlp.down_proj.weight, dense.mlp.down_proj.bias, mom_d,
                             torch.tensor(lp.keep_channels, dtype=torch.long), lam)
        mlp.down_proj = _with_bias(mlp.down_proj, w, b)


@torch.no_grad()
def reconstruct(model: nn.Module, dense_layers: Mapping[int, nn.Module], plan_layers: Sequence[LayerPlan],
                windows: Tensor, lam: float = DEFAULT_LAMBDA, batch_size: int = 4, control: Control | None = None,
                sink: Sink = null_sink) -> list[int]:
    """Repair the pruned `model` in place, first layer to last, on the inputs it produces itself.

    `dense_layers` holds the dense decoder layer for every layer whose widths the plan changed. Returns the
    layers repaired.
    """
    control = control or Control()
    layers = decoder_layers(model)
    todo = sorted(i for i in dense_layers if any(_cuts(layers[i], dense_layers[i])))
    if not todo:
        return []
    batches = layer_inputs(model, windows, batch_size)
    with Stage(sink, f"reconstruct {len(todo)} layers on {windows.shape[0]}x{windows.shape[1]} tokens",
               todo[-1] + 1, "layers") as st:
        for i in range(todo[-1] + 1):
            control.checkpoint()
            layer = layers[i]
            if i not in todo:
                batches = [(layer(h, **kw), kw) for h, kw in batches]
                st.advance(i + 1)
                continue
            dense, lp = dense_layers[i], plan_layers[i]
            cut_heads, cut_channels = _cuts(layer, dense)
            xs = [_o_inputs(dense.self_attn, layer.input_layernorm(h), kw) for h, kw in batches]
            if cut_heads:
                _repair_layer(layer, dense, lp, Moments.of(xs), None, lam)
            cols = head_rows(lp.keep_heads, dense.self_attn.head_dim).to(xs[0].device)
            mids = [h + layer.self_attn.o_proj(x.index_select(-1, cols)) for (h, _), x in zip(batches, xs, strict=True)]
            del xs
            zs = [_down_inputs(dense.mlp, layer.post_attention_layernorm(m)) for m in mids]
            if cut_channels:
                _repair_layer(layer, dense, lp, None, Moments.of(zs), lam)
            ch = torch.tensor(lp.keep_channels, dtype=torch.long, device=zs[0].device)
            batches = [(m + layer.mlp.down_proj(z.index_select(-1, ch)), kw)
                       for m, z, (_, kw) in zip(mids, zs, batches, strict=True)]
            del mids, zs
            st.advance(i + 1)
    return todo


@torch.no_grad()
def dense_moments(model: nn.Module, layer_ids: Sequence[int], windows: Tensor, batch_size: int = 4,
                  control: Control | None = None, sink: Sink = null_sink) -> dict[str, Tensor]:
    """Moments of every `o_proj` and `down_proj` input of the dense `model` in `layer_ids`, as tensors keyed
    'LAYER.o' / 'LAYER.down' (for a safetensors cache); any plan pruning within those layers can use them."""
    return _dense_pass(model, layer_ids, windows, batch_size, control, sink, False)[0]


@torch.no_grad()
def moments_and_losses(model: nn.Module, windows: Tensor, batch_size: int = 4, control: Control | None = None,
                       sink: Sink = null_sink, norms: WindowNorms | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Every layer's moments (as `dense_moments`) and each window's mean next-token loss, in one pass; with
    `norms`, each window's projection input norms too (what wanda reads)."""
    moments, losses = _dense_pass(model, range(len(decoder_layers(model))), windows, batch_size, control, sink,
                                  True, norms)
    assert losses is not None
    return moments, losses


def _dense_pass(model: nn.Module, layer_ids: Sequence[int], windows: Tensor, batch_size: int,
                control: Control | None, sink: Sink, losses: bool,
                norms: WindowNorms | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    control = control or Control()
    layers = decoder_layers(model)
    wanted = sorted(set(layer_ids))
    last = len(layers) - 1 if losses else wanted[-1]
    out: dict[str, Tensor] = {}
    batches = layer_inputs(model, windows, batch_size)

    def seen(key: str, x: Tensor) -> Tensor:
        if norms is not None:  # wanda's input norms, from the tensors this pass makes anyway
            norms.add(key, x)
        return x

    with Stage(sink, f"reconstruction statistics {windows.shape[0]}x{windows.shape[1]}", last + 1,
               "layers") as st:
        for i in range(last + 1):
            control.checkpoint()
            layer = layers[i]
            if i not in wanted:
                batches = [(layer(h, **kw), kw) for h, kw in batches]
                st.advance(i + 1)
                continue
            xs = [_o_inputs(layer.self_attn, seen(f"{i}.q_proj", layer.input_layernorm(h)), kw) for h, kw in batches]
            # the layer's output from its parts (as the decoder layer adds them): no second pass through it
            mids = [h + layer.self_attn.o_proj(seen(f"{i}.o_proj", x)) for (h, _), x in zip(batches, xs, strict=True)]
            out.update(Moments.of(xs).tensors(f"{i}.o"))
            del xs
            zs = [_down_inputs(layer.mlp, seen(f"{i}.gate_proj", layer.post_attention_layernorm(m))) for m in mids]
            out.update(Moments.of([seen(f"{i}.down_proj", z) for z in zs]).tensors(f"{i}.down"))
            batches = [(m + layer.mlp.down_proj(z), kw) for m, z, (_, kw) in zip(mids, zs, batches, strict=True)]
            del mids, zs
            st.advance(i + 1)
    if not losses:
        return out, None
    nll = []
    for b, (h, _) in enumerate(batches):
        ids = windows[b * batch_size : (b + 1) * batch_size].to(h.device)
        nll.append(next_token_nll(model.lm_head(model.model.norm(h)), ids).mean(1).cpu())
    return out, torch.cat(nll)


@torch.no_grad()
def repair_from_moments(model: nn.Module, dense_layers: Mapping[int, nn.Module], plan_layers: Sequence[LayerPlan],
                        moments: Mapping[str, Tensor], lam: float = DEFAULT_LAMBDA) -> list[int]:
    """Repair the pruned `model` in place from the dense model's input moments (no forward pass)."""
    layers = decoder_layers(model)
    done = []
    for i in sorted(dense_layers):
        cut_heads, cut_channels = _cuts(layers[i], dense_layers[i])
        if not (cut_heads or cut_channels):
            continue
        if f"{i}.o.n" not in moments:
            raise AdapruneError(f"no reconstruction statistics for layer {i}")
        _repair_layer(layers[i], dense_layers[i], plan_layers[i],
                      Moments.from_tensors(moments, f"{i}.o") if cut_heads else None,
                      Moments.from_tensors(moments, f"{i}.down") if cut_channels else None, lam)
        done.append(i)
    return done


def pruned_layer_ids(shapes_before: Sequence, plan_layers: Sequence[LayerPlan]) -> list[int]:
    """Layers whose widths the plan changes (the only ones reconstruction touches)."""
    out = []
    for i, (s, lp) in enumerate(zip(shapes_before, plan_layers, strict=True)):
        nh, nkv, ni = lp.widths()
        if (nh, nkv, ni) != (s.n_heads, s.n_kv_heads, s.intermediate):
            out.append(i)
    return out


# --- where the repaired model carries biases, and a stored plan rebuilt with its repair -------------------



def bias_layout(model_type: str, shapes: Sequence, plan_layers: Sequence[LayerPlan]) -> dict[int, tuple[str, ...]]:
    """The projections that get a (new) bias when the plan is repaired: `o_proj` where heads go, `down_proj`
    where channels go. A Llama whose widths all come out equal gets a bias on every projection instead, so
    its standard config (`attention_bias`, `mlp_bias`) describes it and plain `transformers` loads it; the
    zero biases are real parameters and are counted."""
    cut = pruned_layer_ids(shapes, plan_layers)
    layout: dict[int, tuple[str, ...]] = {}
    for i in cut:
        s, lp = shapes[i], plan_layers[i]
        nh, _, ni = lp.widths()
        layout[i] = tuple(p for p, c in (("o_proj", nh < s.n_heads), ("down_proj", ni < s.intermediate)) if c)
    uniform = len({lp.widths() for lp in plan_layers}) == 1
    if model_type == "llama" and uniform and layout:
        layout = {i: PROJ_ATTN + PROJ_MLP for i in range(len(plan_layers))}
    return layout


def bias_params(shapes: Sequence, plan_layers: Sequence[LayerPlan], layout: Mapping[int, Sequence[str]]) -> int:
    """Parameters the layout's biases add (biases a projection already has are not new)."""
    total = 0
    for i, projs in layout.items():
        s, (nh, nkv, ni) = shapes[i], plan_layers[i].widths()
        size = {"q_proj": nh * s.head_dim, "k_proj": nkv * s.head_dim, "v_proj": nkv * s.head_dim,
                "o_proj": s.hidden, "gate_proj": ni, "up_proj": ni, "down_proj": s.hidden}
        has = {"q_proj": s.qkv_bias, "k_proj": s.qkv_bias, "v_proj": s.qkv_bias, "o_proj": s.o_bias,
               "gate_proj": s.mlp_bias, "up_proj": s.mlp_bias, "down_proj": s.mlp_bias}
        total += sum(size[p] for p in projs if not has[p])
    return total


@torch.no_grad()
def add_biases(model: nn.Module, layout: Mapping[int, Sequence[str]]) -> None:
    """Give the layout's projections a zero bias where they have none (reconstruction then fills some)."""
    layers = decoder_layers(model)
    for i, projs in layout.items():
        for p in projs:
            parent = layers[i].self_attn if p in PROJ_ATTN else layers[i].mlp
            lin = getattr(parent, p)
            if lin.bias is None:
                setattr(parent, p, _with_bias(lin, lin.weight, torch.zeros(lin.out_features)))
    if layout:
        describe_widths(model)


def repair_windows(loaded, repair: Repair, sink: Sink = null_sink, control: Control | None = None) -> Tensor:
    """The calibration windows of a repair, drawn from the (still dense) loaded model's text or samples."""
    drawn, _ = draw_windows(loaded.model, loaded.tokenizer, repair.calib, repair.seed, sink,
                            "sample self text (reconstruction)", control)
    return drawn[: repair.take]


def snapshot_layers(model: nn.Module, layer_ids: Sequence[int]) -> dict[int, nn.Module]:
    """Copies of dense decoder layers, taken before slicing: the repair's targets."""
    layers = decoder_layers(model)
    return {i: copy.deepcopy(layers[i]) for i in layer_ids}


def repair_model(model: nn.Module, dense_layers: Mapping[int, nn.Module], plan_layers: Sequence[LayerPlan],
                 repair: Repair, windows: Tensor | None = None, moments: Mapping[str, Tensor] | None = None,
                 control: Control | None = None, sink: Sink = null_sink) -> list[int]:
    """Repair a sliced model (biases in place) as `repair` says: sequentially on `windows`, or from the dense
    model's input `moments`."""
    if repair.mode == "dense":
        if moments is None:
            raise AdapruneError("a dense-statistics repair needs the dense model's input moments")
        return repair_from_moments(model, dense_layers, plan_layers, moments, repair.lam)
    if windows is None:
        raise AdapruneError("a sequential repair needs its calibration windows")
    return reconstruct(model, dense_layers, plan_layers, windows, repair.lam, control=control, sink=sink)


def apply_stored_plan(model: nn.Module, plan, windows_for: Callable[[Repair], Tensor] | None = None,
                      control: Control | None = None, sink: Sink = null_sink) -> None:
    """Slice a dense `model` in place to a stored `Plan` and, if the plan was repaired, repair it the same
    way, on the windows `windows_for(repair)` gives (drawn as `repair_windows` or a session's cache draws them)."""
    if plan.repair is None:
        apply_plan(model, plan.layers)
        return
    if windows_for is None:
        raise AdapruneError("this plan was repaired by reconstruction: its calibration windows are needed")
    repair = Repair.from_dict(plan.repair)
    windows = windows_for(repair)
    shapes = layer_shapes(model)
    ids = pruned_layer_ids(shapes, plan.layers)
    moments = dense_moments(model, ids, windows, control=control, sink=sink) if repair.mode == "dense" else None
    dense_layers = snapshot_layers(model, ids)
    model_type = getattr(model.config, "adaprune_base_model_type", model.config.model_type)
    apply_plan(model, plan.layers)
    add_biases(model, bias_layout(model_type, shapes, plan.layers))
    repair_model(model, dense_layers, plan.layers, repair, windows, moments, control, sink)
