"""Token windows and statistics the trials share, built once per session and cached in its stats/ folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace

import torch

from engine.config import ACT_METRICS, REPAIR_METRICS, SEARCH_METRICS, SELF, SearchConfig
from engine.control import Control
from engine.data.text import calib_parts, load_text, parse_spec
from engine.data.windows import eval_windows, random_windows, sample_self, tokenize
from engine.errors import AdapruneError
from engine.events import (
    Log,
    Sink,
    Stage,
)
from engine.files import write_tensors_atomic
from engine.measure.nll import next_token_nll
from engine.measure.zeroshot import TaskSpec, parse_task, sample_indices, zero_shot
from engine.model.load import Loaded
from engine.model.structure import decoder_layers
from engine.prune.gradsums import GradientCache
from engine.prune.importance import CalibStats, LayerScores, WindowNorms, collect_sample_stats, hooked_norms
from engine.prune.obs import obs_scores
from engine.prune.reconstruct import Repair, dense_moments, merge_moments, moments_and_losses
from engine.search.space import CALIB_LENS, SELECTIONS, repair_sources
from engine.session.artifacts import build_lock
from engine.session.store import Session

CALIB_BATCH = 4  # windows per calibration forward/backward (the same as prune_with's default)
HAVE = "_computed"  # the per-sample statistics file's mask of the pool windows computed so far


def slug(spec: str) -> str:
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


class SearchData:
    """Token windows the trials draw from, built once per session and cached in its stats/ folder."""

    def __init__(self, session: Session, cfg: SearchConfig, loaded: Loaded, sink: Sink, control: Control) -> None:
        self.session, self.cfg, self.loaded, self.sink, self.control = session, cfg, loaded, sink, control
        self.pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.objective: dict[str, torch.Tensor] = {}
        self.samples: dict[tuple[str, int], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}  # rows, computed
        self.norms: dict[str, dict[str, torch.Tensor]] = {}  # per pool: its windows' input norms, every length
        self.grads = GradientCache(int(cfg.grad_cache_gb * 2**30))
        self.moments: dict[tuple[str, int, int | None], dict[str, torch.Tensor]] = {}  # oldest first
        self.obs: dict[int, LayerScores] | None = None
        self._joint: dict[str, torch.Tensor] | None = None  # self text drawn once for the pool and the objective

    def _cached(self, name: str, build, stage: str | None = None) -> dict[str, torch.Tensor]:
        """stats/NAME, built once per session under its lock; only the process that builds it reports the
        `stage` (a worker that waits or reads the file does not repeat it in the session's log)."""
        from safetensors.torch import load_file

        path = self.session.stats_dir / f"{name}.safetensors"
        if path.exists():
            return load_file(path)
        with build_lock(self.session, name, self.sink, self.control):
            if path.exists():  # another process (a worker) built it while this one waited
                return load_file(path)
            with Stage(self.sink, stage) if stage else contextlib.nullcontext():
                tensors = build()
            write_tensors_atomic(path, tensors)
        return tensors

    def _windows(self, spec: str, role: str, n: int, length: int, seed: int) -> torch.Tensor:
        model, tok = self.loaded.model, self.loaded.tokenizer
        if parse_spec(spec).name == SELF and (role, n, length, seed) in self._self_roles():
            return self._self_draw()[role]
        if parse_spec(spec).name == SELF:
            with Stage(self.sink, f"sample self text ({role})", n, "samples") as st:
                return sample_self(model, tok, n, length, seed, on_batch=st.advance, control=self.control)
        ids = tokenize(tok, load_text(spec, "calib" if role == "calibration" else "eval"))
        if role == "calibration":
            return random_windows(ids, n, length, seed)
        return eval_windows(ids, length, n)

    def _self_roles(self) -> dict[tuple[str, int, int, int], int]:
        """The self-text draws a session makes, when the calibration pool and the objective both sample: one
        draw serves both (a decode step costs about the same for 16 or 64 sequences on a CPU)."""
        cfg = self.cfg
        if not (SELF in cfg.sources and SELF in [parse_spec(s).name for s in cfg.objective]
                and cfg.objective_len == max(CALIB_LENS)):
            return {}
        return {("calibration", cfg.pool_size, max(CALIB_LENS), cfg.seed): cfg.pool_size,
                ("objective", cfg.objective_windows, cfg.objective_len, cfg.seed + 1): cfg.objective_windows}

    def _self_draw(self) -> dict[str, torch.Tensor]:
        """The calibration pool's and the objective's self text as one draw: different sequences of it."""
        if self._joint is None:
            cfg, sizes = self.cfg, list(self._self_roles().values())

            def build() -> dict[str, torch.Tensor]:
                with Stage(self.sink, "sample self text (calibration and objective)", sum(sizes), "samples") as st:
                    return {"ids": sample_self(self.loaded.model, self.loaded.tokenizer, sum(sizes), max(CALIB_LENS),
                                               cfg.seed, on_batch=st.advance, control=self.control)}

            # kept on disk too: a worker started beside the driver reads this draw instead of sampling its own
            ids = self._cached(f"self-{sum(sizes)}x{max(CALIB_LENS)}-{cfg.seed}", build)["ids"]
            self._joint = {"calibration": ids[: sizes[0]], "objective": ids[sizes[0]:]}
        return self._joint

    def pool(self, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """pool_size windows of the longest calibration length, with the dense model's loss on each."""
        if source not in self.pools:
            cfg = self.cfg

            def build() -> dict[str, torch.Tensor]:
                ids = self._windows(source, "calibration", cfg.pool_size, max(CALIB_LENS), cfg.seed)
                # wanda's statistics (input norms per window) come with the pass: wanda trials need no backward
                if source not in repair_sources(cfg) and REPAIR_METRICS.isdisjoint(cfg.metrics or SEARCH_METRICS):
                    loss, norms = self._losses_and_norms(ids)
                else:  # repaired and obs trials read the dense model's input moments on the pool: the same pass
                    norms = WindowNorms(CALIB_LENS)
                    moments, loss = moments_and_losses(self.loaded.model, ids, CALIB_BATCH, self.control, self.sink,
                                                       norms)
                    key = (pool_repair(source, cfg).calib, cfg.seed, cfg.pool_size)
                    self._share(key, self._keep(key, moments))  # before the pool's file: who sees it finds them
                write_tensors_atomic(self._norms_path(source), _by_length(norms))
                return {"ids": ids, "loss": loss}

            data = self._cached(f"pool-{slug(source)}-{cfg.seed}", build, f"calibration pool {source}")
            self.pools[source] = (data["ids"], data["loss"])
        return self.pools[source]

    def _losses_and_norms(self, ids: torch.Tensor) -> tuple[torch.Tensor, WindowNorms]:
        """One forward pass over pool windows: each window's loss and its input norms at every length."""
        with hooked_norms(self.loaded.model, CALIB_LENS) as norms:
            loss = window_losses(self.loaded.model, ids, self.control)
        return loss, norms

    def _norms_path(self, source: str):
        return self.session.stats_dir / f"norms-{slug(source)}-{self.cfg.seed}.safetensors"

    def window_norms(self, source: str, length: int) -> dict[str, torch.Tensor]:
        """Every pool window's projection input norms at one window length (what wanda reads), rows indexed as
        the pool: from the pool's own pass, or (a session whose pools were built before) one forward pass."""
        ids, _ = self.pool(source)

        def build() -> dict[str, torch.Tensor]:
            return _by_length(self._losses_and_norms(ids)[1])

        if source not in self.norms:
            self.norms[source] = self._cached(self._norms_path(source).stem, build, f"activation norms {source}")
        prefix = f"{length}."
        return {k.removeprefix(prefix): v for k, v in self.norms[source].items() if k.startswith(prefix)}

    def sample_stats(self, source: str, length: int, subset: torch.Tensor,
                     metric: str | None = None) -> dict[str, torch.Tensor]:
        """Per-window statistics of a pool at one window length, rows indexed as the pool: computed (a backward
        per batch of windows) the first time a trial asks for a window and kept (stats/), so a search pays for
        the windows its trials use, not for the whole pool. For `metric` wanda only the input norms, which
        need no backward."""
        from safetensors.torch import load_file

        if metric in ACT_METRICS:
            return self.window_norms(source, length)
        key = (source, length)
        path = self.session.stats_dir / f"samples-{slug(source)}-{length}-{self.cfg.seed}.safetensors"
        ids, _ = self.pool(source)
        if key not in self.samples and path.exists():
            stored = load_file(path)
            # a file without the mask is a whole pool's pass (sessions before windows were computed lazily)
            have = stored.pop(HAVE, torch.ones(ids.shape[0], dtype=torch.bool)).bool()
            self.samples[key] = (stored, have)
        stats, have = self.samples.get(key, ({}, torch.zeros(ids.shape[0], dtype=torch.bool)))
        missing = sorted({int(i) for i in subset} - set(have.nonzero().flatten().tolist()))
        if missing:
            with build_lock(self.session, path.stem, self.sink, self.control):
                if path.exists():  # another process may have computed some of these windows meanwhile
                    stored = load_file(path)
                    have = stored.pop(HAVE, torch.ones(ids.shape[0], dtype=torch.bool)).bool()
                    stats = stored
                missing = sorted({int(i) for i in subset} - set(have.nonzero().flatten().tolist()))
                if missing:
                    self._compute_samples(key, path, ids, stats, have, missing)
                else:
                    self.samples[key] = (stats, have)
        return self.samples.get(key, (stats, have))[0]

    def _compute_samples(self, key: tuple[str, int], path, ids: torch.Tensor, stats: dict, have: torch.Tensor,
                         missing: list[int]) -> None:
        source, length = key
        model = self.loaded.model
        # these windows' gradients are computed anyway: their sum serves taylor1 trials on them
        grad_sum = self.grads.sum_accumulator(key, missing, model, whole=len(missing) == ids.shape[0])
        with Stage(self.sink, f"per-sample statistics {source} x{length}"):
            new = collect_sample_stats(model, ids[missing, :length], self.control, self.sink,
                                       grad_sum.add if grad_sum else None, CALIB_BATCH)
        if grad_sum is not None:
            grad_sum.close()
        rows = torch.tensor(missing)
        for k, v in new.items():
            if k not in stats:
                stats[k] = torch.zeros((ids.shape[0], *v.shape[1:]), dtype=v.dtype)
            stats[k][rows] = v
        have = have.clone()
        have[rows] = True
        self.samples[key] = (stats, have)
        tensors = {**stats, HAVE: have.to(torch.uint8)}
        write_tensors_atomic(path, tensors)

    def gradient_stats(self, model, source: str, length: int, subset: torch.Tensor, layer_ids: list[int],
                       squares: bool) -> CalibStats:
        """Mean gradient (and Fisher diagonal) of a subset of a pool, from the nearest gradient sum kept."""
        ids, _ = self.pool(source)
        return self.grads.stats(model, (source, length), ids[:, :length], subset.tolist(), layer_ids, squares,
                                CALIB_BATCH, self.control, self.sink)

    def repair_windows(self, repair: Repair) -> torch.Tensor:
        """A repair's calibration windows, drawn from the dense model once per session (stats/); the draw a
        calibration pool is made of is that pool."""
        parts = calib_parts(repair.calib)
        if len(parts) > 1:  # several texts: each part as on its own, joined
            return torch.cat([self.repair_windows(replace(repair, calib=p, take=None)) for p in parts])[: repair.take]
        spec = parse_spec(repair.calib)
        if (spec.n, spec.seq_len, repair.seed) == (self.cfg.pool_size, max(CALIB_LENS), self.cfg.seed):
            return self.pool(spec.name)[0][: repair.take]
        data = self._cached(f"repair-{slug(repair.calib)}-{repair.seed}", lambda: {
            "ids": self._windows(spec.name, "calibration", spec.n, spec.seq_len, repair.seed)},
            f"reconstruction text {spec.name}")
        return data["ids"][: repair.take]

    def repair_moments(self, repair: Repair) -> dict[str, torch.Tensor]:
        """The dense model's o_proj/down_proj input moments on a repair's windows, every layer, kept in memory
        under `repair_cache_gb` (the oldest dropped first) so repaired trials only solve, and within the same
        budget in stats/, built once per session for every process of the search."""
        key = (repair.calib, repair.seed, repair.take)
        if key in self.moments:
            self.moments[key] = self.moments.pop(key)  # most recently used last
            return self.moments[key]
        parts = calib_parts(repair.calib)
        if len(parts) > 1 and repair.take is None:
            # every window of each text: the moments of each (shared with repairs from one pool), merged exactly
            moments = merge_moments([self.repair_moments(replace(repair, calib=p, take=parse_spec(p).n))
                                     for p in parts])
        else:
            model = self.loaded.model
            layers = list(range(len(decoder_layers(model))))
            windows = self.repair_windows(repair)  # first: a pool's build also writes its moments
            path = self._moments_path(key)
            if not path.exists():
                with build_lock(self.session, path.stem, self.sink, self.control):
                    if not path.exists():  # nobody built them meanwhile (or they are too big to share)
                        moments = dense_moments(model, layers, windows, CALIB_BATCH, self.control, self.sink)
                        return self._share(key, self._keep(key, moments))
            from safetensors.torch import load_file

            moments = load_file(path)
        return self._keep(key, moments)

    def _moments_path(self, key: tuple):
        calib, seed, take = key
        return self.session.stats_dir / f"moments-{slug(f'{calib}|{take}')}-{seed}.safetensors"

    def _share(self, key: tuple, moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write a repair's moments to stats/ for the session's other processes (workers), when they fit the
        same `repair_cache_gb` budget as memory (an 8B model's are tens of GB: each process computes its own)."""
        size = sum(v.numel() * v.element_size() for v in moments.values())
        path = self._moments_path(key)
        if size <= self.cfg.repair_cache_gb * 2**30 and not path.exists():
            write_tensors_atomic(path, moments)
        return moments

    def _keep(self, key: tuple, moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Moments kept in memory under `repair_cache_gb`, the least recently used dropped first."""
        moments = {k: v.float() if k.endswith(".m2") else v for k, v in moments.items()}
        size = sum(v.numel() * v.element_size() for v in moments.values())
        budget = int(self.cfg.repair_cache_gb * 2**30)
        while self.moments and size + sum(sum(v.numel() * v.element_size() for v in m.values())
                                          for m in self.moments.values()) > budget:
            self.moments.pop(next(iter(self.moments)))
        if size <= budget:
            self.moments[key] = moments
        return moments

    def obs_scores(self) -> dict[int, LayerScores]:
        """`obs` scores of every layer from the dense model's input moments on every calibration pool together
        (several domains: measured better on held-out text than either alone, bench/RESULTS.md), built once per
        session; a repair from all pools solves from the same moments."""
        if self.obs is None:
            model = self.loaded.model
            n = len(decoder_layers(model))
            repair = pools_repair(self.cfg.sources, self.cfg)

            def build() -> dict[str, torch.Tensor]:
                scores = obs_scores(model, range(n), self.repair_moments(repair), self.control)
                return {f"{i}.{k}": getattr(sc, k) for i, sc in scores.items()
                        for k in ("heads", "kv_groups", "channels")}

            data = self._cached(f"obs-{slug(repair.calib)}-{self.cfg.seed}", build, "obs scores")
            self.obs = {i: LayerScores(data[f"{i}.heads"], data[f"{i}.kv_groups"], data[f"{i}.channels"])
                        for i in range(n)}
        return self.obs

    def prepare(self) -> None:
        """Build every pool and objective text before the first trial, so trial times are trial times."""
        self.objective_sets()
        self.dense_accuracy()
        for source in self.cfg.sources:
            self.pool(source)

    def objective_accuracy(self, model) -> float | None:
        """Mean zero-shot accuracy of `model` on the objective's task rows (None without objective tasks)."""
        if not self.cfg.objective_tasks:
            return None
        accs = []
        for t in self.cfg.objective_tasks:
            spec = parse_task(t)
            r = zero_shot(model, self.loaded.tokenizer, [spec], seed=self.cfg.seed, control=self.control,
                          indices=objective_task_indices(spec, self.cfg))
            accs.append(r[spec.name].acc)
        return sum(accs) / len(accs)

    def dense_accuracy(self) -> float | None:
        if not self.cfg.objective_tasks:
            return None
        data = self._cached(f"objective-acc-{slug(json.dumps(self.cfg.objective_tasks))}-{self.cfg.seed}",
                            lambda: {"acc": torch.tensor([self.objective_accuracy(self.loaded.model)])},
                            "objective tasks (dense)")
        acc = float(data["acc"][0])
        self.sink(Log(f"dense model's zero-shot accuracy on the objective's task rows: {acc:.3f}"))
        return acc

    def objective_sets(self) -> dict[str, torch.Tensor]:
        if not self.objective:
            cfg = self.cfg
            for spec in cfg.objective:
                def build(spec: str = spec) -> dict[str, torch.Tensor]:
                    # seed + 1: text sampled for the objective is a different draw from any calibration pool
                    return {"ids": self._windows(spec, "objective", cfg.objective_windows, cfg.objective_len,
                                                 cfg.seed + 1)}

                self.objective[spec] = self._cached(f"objective-{slug(spec)}-{cfg.seed}", build,
                                                    f"objective text {spec}")["ids"]
        return self.objective


def _by_length(norms: WindowNorms) -> dict[str, torch.Tensor]:
    """WindowNorms as one file: keys 'LENGTH.LAYER.PROJ.act'."""
    return {f"{n}.{k}": v for n in norms.lengths for k, v in norms.tensors(n).items()}


def pool_repair(source: str, cfg: SearchConfig, lam: float = 1.0, take: int | None = None) -> Repair:
    """A repair (from the dense model's statistics) on the first `take` windows of a source's calibration pool."""
    return Repair(f"{source}:{cfg.pool_size}x{max(CALIB_LENS)}", lam, "dense", cfg.seed,
                  cfg.pool_size if take is None else take)


def pools_repair(sources: list[str], cfg: SearchConfig, lam: float = 1.0) -> Repair:
    """A repair on every window of the calibration pools of `sources`, joined."""
    if len(sources) == 1:
        return pool_repair(sources[0], cfg, lam)
    joined = "+".join(f"{s}:{cfg.pool_size}x{max(CALIB_LENS)}" for s in sources)
    return Repair(joined, lam, "dense", cfg.seed)


@torch.inference_mode()
def window_losses(model, ids: torch.Tensor, control: Control, batch_size: int = 8) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for b in range(0, ids.shape[0], batch_size):
        control.checkpoint()
        x = ids[b : b + batch_size].to(device)
        out.append(next_token_nll(model(input_ids=x).logits, x).mean(1).cpu())
    return torch.cat(out)


def pick_windows(ids: torch.Tensor, loss: torch.Tensor, n: int, length: int, select: str, seed: int) -> torch.Tensor:
    """Sample-aware selection from a pool: by seed, or by the dense model's loss on each window."""
    return ids[pick_indices(loss, n, select, seed), :length]


def pick_indices(loss: torch.Tensor, n: int, select: str, seed: int) -> torch.Tensor:
    ids = loss
    n = min(n, ids.shape[0])
    if select == "random":
        idx = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    elif select == "low-loss":
        idx = torch.argsort(loss)[:n]
    elif select == "high-loss":
        idx = torch.argsort(loss, descending=True)[:n]
    elif select == "typical":
        idx = torch.argsort((loss - loss.median()).abs())[:n]
    elif select == "spread":
        order = torch.argsort(loss)
        idx = order[torch.linspace(0, len(order) - 1, n).round().long()]
    else:
        raise AdapruneError(f"unknown calibration selection {select!r}: {', '.join(SELECTIONS)}")
    return idx


def objective_task_indices(spec: TaskSpec, cfg: SearchConfig) -> list[int]:
    """The task rows the objective scores: a seeded draw that benchmarks of the same file leave out."""
    return sample_indices(spec.rows, cfg.objective_task_rows, cfg.seed + 2) or list(range(spec.rows))

