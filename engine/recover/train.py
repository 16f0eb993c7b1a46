"""Recovery: LoRA fine-tuning of a session's pruned model (peft), resumable, merged back into plain weights.

Defaults follow LLM-Pruner's recovery (rank 8, alpha 16, dropout 0.05 on every projection, lr 1e-4, 256-token
sequences) on text that neither the search nor the benchmarks read: the built-in corpus's calibration split
trains, its `valid` split scores progress, its `test` split stays the benchmarks'. A session keeps the adapter,
the optimiser state and the step in `recovery/` (safetensors and JSON): `--resume` continues exactly where an
interrupted run stopped (batch order, dropout masks and learning rate are functions of the step), and export
and benchmarks merge the adapter into the pruned weights, so the result loads in plain `transformers`.
"""

from __future__ import annotations

import copy
import math
import secrets
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from engine.config import PROJ, SELF, RecoverConfig, SearchConfig
from engine.control import Control
from engine.data.text import check_source, load_text, parse_spec, text_hash
from engine.data.windows import eval_windows, sample_self, tokenize
from engine.errors import AdapruneError, Cancelled
from engine.events import Log, RecoveryStep, Sink, Stage, null_sink
from engine.files import atomic_folder, clear_stale, write_tensors_atomic
from engine.measure.evaluate import perplexity
from engine.model.load import load_configured
from engine.model.structure import count_params
from engine.prune.plan import Plan
from engine.prune.reconstruct import apply_stored_plan
from engine.search.data import SearchData
from engine.session.layout import (
    ADAPTER,
    OPTIMIZER,
    checkpoint_dir,
    plan_id,
    recovery_dir,
    recovery_state,
    session_plan,
    write_recovery_state,
)
from engine.session.records import RecoveryState
from engine.session.requests import SessionControl
from engine.session.store import Session


def validate(cfg: RecoverConfig) -> None:
    checks = [
        (cfg.steps >= 1, f"--steps {cfg.steps}: give at least one step"),
        (cfg.batch_size >= 1, f"--batch {cfg.batch_size}: give at least one sequence per step"),
        (cfg.seq_len >= 8, f"--seq-len {cfg.seq_len}: give at least 8 tokens"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr {cfg.lr}: give a positive learning rate"),
        (cfg.warmup is None or 0 <= cfg.warmup <= cfg.steps,
         f"--warmup {cfg.warmup}: give 0 to {cfg.steps} steps, at most --steps (or the rate never reaches --lr)"),
        (cfg.rank >= 1, f"--rank {cfg.rank}: the LoRA rank must be at least 1"),
        (cfg.alpha > 0, f"--alpha {cfg.alpha}: give a positive LoRA alpha"),
        (0 <= cfg.dropout < 1, f"--dropout {cfg.dropout}: give a probability in [0, 1)"),
        (cfg.valid_windows >= 1 and cfg.valid_len >= 2, "validation needs at least one window of 2 tokens"),
        (cfg.eval_every >= 1 and cfg.save_every >= 1, "--eval-every and --save-every must be at least 1"),
        (bool(cfg.data), "no training text: give at least one --data source"),
        (bool(cfg.valid), "no validation text: give at least one --valid source"),
        (bool(cfg.targets) and set(cfg.targets) <= set(PROJ),
         f"--targets {','.join(cfg.targets)}: choose among {','.join(PROJ)}"),
        (cfg.plan == "best" or cfg.plan.startswith("plan:"), f"--plan {cfg.plan}: give best or plan:NAME"),
        (0 <= cfg.distil <= 1, f"--distil-weight {cfg.distil}: give a weight in [0, 1] for the KL term"),
    ]
    for ok, message in checks:
        if not ok:
            raise AdapruneError(message)
    for spec in cfg.data:
        ts = check_source(spec, "calib")
        if ts.name == SELF and ts.n is None:
            raise AdapruneError(f"--data {spec!r}: say how much text to sample from the dense model, self:NxL "
                                f"(N sequences of L tokens), e.g. self:256x256")
    for spec in cfg.valid:
        if check_source(spec, "eval").name == SELF:
            raise AdapruneError(f"--valid {spec!r}: validation reads held-out text, not text sampled for training")


def loss_name(cfg: RecoverConfig) -> str:
    """What the recovery minimised, for tables and cards."""
    if cfg.distil == 0:
        return "LM"
    return "KL to dense" if cfg.distil == 1 else f"{cfg.distil:g} KL to dense + {1 - cfg.distil:g} LM"


def distil_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over next-token positions of KL(teacher || student), in float32."""
    s = student_logits[:, :-1].float().flatten(0, 1).log_softmax(-1)
    t = teacher_logits[:, :-1].float().flatten(0, 1).log_softmax(-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def warmup_steps(cfg: RecoverConfig) -> int:
    """The warm-up asked for, or a tenth of the steps (at most 10), so a short run still reaches its rate."""
    return min(10, cfg.steps // 10) if cfg.warmup is None else cfg.warmup


def lr_at(cfg: RecoverConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to zero at the last step (as transformers does)."""
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))


def batch_indices(n_windows: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The windows of a step: epochs are seeded permutations, so any step's batch is known without replay."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


def _lora_config(cfg: RecoverConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                      bias="none", task_type="CAUSAL_LM")


def _windows(tokenizer, specs: list[str], role: str, seq_len: int, limit: int | None,
             sampled: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    parts = []
    for spec in specs:
        if parse_spec(spec).name == SELF:  # sampled from the dense model: its sequences, joined and re-cut
            ids = sampled[spec].flatten()
        else:
            ids = tokenize(tokenizer, load_text(spec, role))
        if ids.numel() < seq_len:
            raise AdapruneError(f"{spec}: {ids.numel()} tokens, fewer than one {seq_len}-token sequence; "
                                f"give more text or a smaller --seq-len")
        parts.append(eval_windows(ids, seq_len, limit))
    return torch.cat(parts)


def _texts_hash(specs: list[str], role: str) -> dict[str, str]:
    """Each text's SHA-256; text sampled from the dense model is named by its spec and seed (the samples are
    kept in the session, so a resumed run reads the same ones)."""
    return {s: SELF if parse_spec(s).name == SELF else text_hash(load_text(s, role)) for s in specs}


def _sampled_text(session: Session, loaded, cfg: RecoverConfig, sink: Sink,
                  control: Control) -> dict[str, torch.Tensor]:
    """Text the dense model samples for training (`self:NxL` in --data), drawn once and kept in recovery/, so a
    resumed or restarted run trains on the same sequences. `loaded` must still be dense."""
    from safetensors.torch import load_file

    out = {}
    for spec in cfg.data:
        ts = parse_spec(spec)
        if ts.name != SELF:
            continue
        path = recovery_dir(session) / f"text-self-{ts.n}x{ts.seq_len}-{cfg.seed}.safetensors"
        if path.exists():
            out[spec] = load_file(str(path))["ids"]
            continue
        with Stage(sink, "sample self text (recovery)", ts.n, "samples") as st:
            ids = sample_self(loaded.model, loaded.tokenizer, ts.n, ts.seq_len, cfg.seed, on_batch=st.advance,
                              control=control)
        write_tensors_atomic(path, {"ids": ids})
        out[spec] = ids
    return out


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save(session: Session, peft_model, optimizer, state: RecoveryState) -> None:
    """A checkpoint folder per step, then state.json naming it (written atomically), then older folders go:
    a crash at any moment leaves a state that names a complete checkpoint."""
    import shutil

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    name = f"ckpt-step-{state.step}-{secrets.token_hex(4)}"  # a new folder every time, even for one step
    folder = recovery_dir(session) / name
    adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    opt = optimizer.state_dict()
    moments = {f"{i}.{k}": v.detach().cpu().contiguous()
               for i, s in opt["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    with atomic_folder(folder) as tmp:
        save_file(adapter, str(tmp / ADAPTER))
        save_file(moments, str(tmp / OPTIMIZER))
    state.param_groups = [dict(g) for g in opt["param_groups"]]
    state.checkpoint = name
    write_recovery_state(session, state)
    for old in recovery_dir(session).glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    clear_stale(recovery_dir(session), "ckpt-*")  # a checkpoint a killed run left half-made
    for old in (ADAPTER, OPTIMIZER):  # the first layout's checkpoint, once a newer one is named
        (recovery_dir(session) / old).unlink(missing_ok=True)


def _load_optimizer(optimizer, folder: Path, state: RecoveryState) -> None:
    from safetensors.torch import load_file

    moments = load_file(str(folder / OPTIMIZER))
    per_param: dict[int, dict] = {}
    for key, value in moments.items():
        i, _, name = key.partition(".")
        per_param.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.param_groups})


def _wrap(model: nn.Module, cfg: RecoverConfig):
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: the same seed, the same recovery
    with warnings.catch_warnings():  # peft calls an API transformers deprecated: not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, _lora_config(cfg))


def _settle(session: Session, cfg: RecoverConfig, resume: bool,
            restart: bool) -> tuple[RecoverConfig, RecoveryState | None]:
    """The configuration to train with (a resumed run takes its saved one) and the recovery on disk, if any;
    every contradiction between the two is refused here."""
    name = session.name
    try:
        prior = recovery_state(session)
    except AdapruneError:
        if not restart:
            raise
        prior = None  # a damaged state is what --restart discards: it does not stand in its way
    if resume and restart:
        raise AdapruneError("--resume continues a recovery and --restart discards it: give one of them")
    if not resume:
        validate(cfg)  # what the user typed is checked first
    if resume:
        if prior is None:
            raise AdapruneError(f"session {name!r} has no recovery to resume: run `adaprune recover {name}`")
        if prior.status == "done":
            raise AdapruneError(f"session {name!r}: its recovery already finished ({prior.step} steps); "
                                f"--restart to train again")
        cfg = prior.config
    elif prior is not None and not restart:
        raise AdapruneError(f"session {name!r} already has a recovery ({prior.step}/{prior.config.steps} "
                            f"steps, {prior.status}): --resume to continue it, or --restart to train again")
    validate(cfg)
    return cfg, (prior if resume else None)


def _student(session: Session, scfg: SearchConfig, loaded, plan: Plan, cfg: RecoverConfig, sink: Sink,
             control: Control):
    """The pruned model wrapped for LoRA, and the dense model as the teacher when distilling (else None)."""
    model = loaded.model
    teacher = None
    if cfg.distil > 0:  # the dense model, kept whole as the teacher (memory: one more copy of the weights)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    # a repaired plan's windows come from the dense model (self text is sampled from it) before it is cut
    apply_stored_plan(model, plan, SearchData(session, scfg, loaded, sink, control).repair_windows, control, sink)
    model.requires_grad_(False)
    peft_model = _wrap(model, cfg)
    if cfg.grad_checkpointing:  # transformers 5 renamed it; older versions have only the first name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model, teacher


def _loss(peft_model, teacher, x: torch.Tensor, cfg: RecoverConfig) -> torch.Tensor:
    """The language-modelling loss, the KL divergence to the teacher, or their mix (`cfg.distil`)."""
    if teacher is None:
        return peft_model(input_ids=x, labels=x).loss
    out = peft_model(input_ids=x, labels=x if cfg.distil < 1 else None)
    with torch.no_grad():
        target = teacher(input_ids=x).logits
    loss = cfg.distil * distil_loss(out.logits, target)
    return loss + (1 - cfg.distil) * out.loss if cfg.distil < 1 else loss


def _train(session: Session, cfg: RecoverConfig, state: RecoveryState, peft_model, teacher, optimizer, params,
           train: torch.Tensor, valid: torch.Tensor, sink: Sink, control: Control) -> None:
    """Steps from `state.step` to the end, a checkpoint every `save_every`; a cancel saves and re-raises."""
    device = next(peft_model.parameters()).device
    done = state.step
    try:
        with Stage(sink, "recovery", cfg.steps, "steps") as stage:
            stage.advance(done)
            for step in range(done, cfg.steps):
                control.checkpoint()
                torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout: a resumed run draws the same masks
                lr = lr_at(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                peft_model.train()
                x = train[batch_indices(train.shape[0], step, cfg.batch_size, cfg.seed)].to(device)
                loss = _loss(peft_model, teacher, x, cfg)
                if not torch.isfinite(loss):
                    raise AdapruneError(f"the recovery loss is not finite at step {step + 1}: lower --lr "
                                        f"(now {cfg.lr:g})")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                entry = {"step": done, "loss": loss.item(), "lr": lr}
                state.history.append(entry)
                state.step = done
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    peft_model.eval()
                    entry["valid_ppl"] = perplexity(peft_model, valid, control=control)
                sink(RecoveryStep(done, cfg.steps, entry["loss"], lr, entry.get("valid_ppl")))
                stage.advance(done)
                if done % cfg.save_every == 0 and done < cfg.steps:
                    _save(session, peft_model, optimizer, state)
    except (Cancelled, KeyboardInterrupt):
        state.status = "stopped"
        _save(session, peft_model, optimizer, state)  # every finished step is kept: --resume goes on
        raise


def run_recovery(
    root: Path, name: str, cfg: RecoverConfig, sink: Sink = null_sink, control: Control | None = None,
    resume: bool = False, restart: bool = False, since: float | None = None,
) -> RecoveryState:
    """Fine-tune the session's pruned model with LoRA; returns the recovery's state (also in recovery/state.json).

    Its events go to the session's log too, and pause/cancel requests from any process made since `since`
    (default: now) are obeyed, so an app attached later follows and controls it."""
    session = Session.open(root, name)
    sink = session.logged(sink, "recover")
    control = SessionControl(session, "recover", sink, control, since)
    cfg, prior = _settle(session, cfg, resume, restart)
    plan_dict = session_plan(session, cfg.plan)
    with Stage(sink, "recovery text"):  # a missing file or an unreachable hub fails before the model loads
        hashes = {"data": _texts_hash(cfg.data, "calib"), "valid": _texts_hash(cfg.valid, "eval")}
    if prior is not None and (prior.data, prior.valid) != (hashes["data"], hashes["valid"]):
        raise AdapruneError(f"session {name!r}: the recovery's training or validation text changed since it began "
                            f"(its SHA-256 differs); --restart to train on the new text")
    with session.lock("recovery"):
        scfg = SearchConfig.from_dict(session.config())
        loaded = load_configured(scfg, sink)
        sampled = _sampled_text(session, loaded, cfg, sink, control)  # from the dense model, before it is cut
        with Stage(sink, "recovery windows"):
            train = _windows(loaded.tokenizer, cfg.data, "calib", cfg.seq_len, None, sampled)
            valid = _windows(loaded.tokenizer, cfg.valid, "eval", cfg.valid_len, cfg.valid_windows)
        plan = Plan.from_dict(plan_dict)
        if plan.params_before != count_params(loaded.model):
            raise AdapruneError(f"session {name!r}: its model {scfg.model!r} no longer matches the plan")
        if prior is not None and prior.plan_id != plan_id(plan_dict):
            raise AdapruneError(f"session {name!r}: the {cfg.plan} plan changed since the recovery began; "
                                f"--restart to train on the new one")
        peft_model, teacher = _student(session, scfg, loaded, plan, cfg, sink, control)
        if prior is not None:
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(peft_model, load_file(str(checkpoint_dir(session, prior) / ADAPTER)))
        params = [p for _, p in _trainable(peft_model)]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        if prior is not None:
            _load_optimizer(optimizer, checkpoint_dir(session, prior), prior)
            state = prior
        else:
            peft_model.eval()
            before = perplexity(peft_model, valid, control=control, sink=sink, stage="validation PPL (before)")
            state = RecoveryState(cfg, 0, "running", cfg.plan, plan_id(plan_dict), before, None, [],
                                  int(train.shape[0]), hashes["data"], hashes["valid"],
                                  sum(p.numel() for p in params), count_params(loaded.model), time.time())
            sink(Log(f"recovery: {state.trainable_params:,} LoRA parameters, {train.shape[0]} sequences of "
                     f"{cfg.seq_len} tokens; validation PPL before {before:.2f}"))
        state.status = "running"
        _train(session, cfg, state, peft_model, teacher, optimizer, params, train, valid, sink, control)
        state.status = "done"
        state.valid_ppl_after = state.history[-1].get("valid_ppl")
        state.finished = time.time()
        _save(session, peft_model, optimizer, state)
        sink(Log(f"recovery done: validation PPL {state.valid_ppl_before:.2f} -> {state.valid_ppl_after:.2f}"))
        return state


def recovered_model(session: Session, model: nn.Module, windows_for=None) -> tuple[nn.Module, RecoveryState]:
    """The session's pruned model with its finished recovery's adapter merged in: plain modules, plain weights.

    `model` is the dense model (pruned in place); a repaired plan also needs `windows_for` (its reconstruction
    windows, e.g. `SearchData.repair_windows`). Returns the merged model and the recovery's state.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = recovery_state(session)
    if state is None:
        raise AdapruneError(f"session {session.name!r} has no recovery: run `adaprune recover {session.name}` first")
    if state.status != "done":
        raise AdapruneError(f"session {session.name!r}: its recovery stopped at step {state.step} of "
                            f"{state.config.steps}: `adaprune recover {session.name} --resume` to finish it")
    plan_dict = session_plan(session, state.plan)
    if plan_id(plan_dict) != state.plan_id:
        raise AdapruneError(f"session {session.name!r}: the {state.plan} plan changed after the recovery was "
                            f"trained; `adaprune recover {session.name} --restart` to train on the new one")
    cfg = state.config
    apply_stored_plan(model, Plan.from_dict(plan_dict), windows_for)
    peft_model = _wrap(model, cfg)
    set_peft_model_state_dict(peft_model, load_file(str(checkpoint_dir(session, state) / ADAPTER)))
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(False)
    return merged.eval(), state
