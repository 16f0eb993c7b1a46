"""Export a session's plan (the best, re-planned with uniform widths, or LoRA-recovered and merged) as a
Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import SearchConfig
from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Log, Sink, Stage, null_sink
from engine.model.export import check_out_dir, export
from engine.model.load import load_configured
from engine.model.structure import count_params
from engine.prune.plan import Plan
from engine.prune.reconstruct import apply_stored_plan
from engine.recover.train import loss_name, recovered_model
from engine.search.data import SearchData
from engine.search.objective import progressive_objective
from engine.search.params import TrialParams
from engine.search.trial import prune_trial
from engine.session.layout import OVERRIDES_PLAN, best_record, recovery_state, session_plan
from engine.session.store import Session

WIDTHS = ("plan", "uniform")


def export_session(root: Path, name: str, out: Path, force: bool = False, sink: Sink = null_sink,
                   widths: str = "plan", control: Control | None = None, recovered: bool = False,
                   plan_name: str | None = None) -> str:
    """Export a session's model as a Hugging Face folder: the best trial's plan, or with `plan_name`
    "plan:NAME" a saved plan (plan:overrides is the one the Layers screen re-evaluated with the user's edits);
    by default the best, or with `recovered` the plan the recovery trained on.

    widths="plan": the best plan as searched (per-layer widths unless every layer came out equal);
    "uniform": re-planned from the best configuration with the same cut in every layer (no protected layers,
    no ramp or global ranking, no overrides), so a standard config describes it and plain `transformers`
    loads it — a different, usually slightly worse, model, whose objective is reported in the card.
    """
    if widths not in WIDTHS:
        raise AdapruneError(f"--widths {widths!r}: choose plan or uniform")
    session = Session.open(root, name)
    check_out_dir(out, force)
    best = best_record(session)
    if best is None:
        raise AdapruneError(f"session {name!r} has no completed trial yet: run or resume its search first")
    cfg = SearchConfig.from_dict(session.config())
    if recovered and widths != "plan":
        raise AdapruneError("--recovered exports the plan its adapter was trained on: leave --widths at plan")
    state = recovery_state(session) if recovered else None
    trained = state.plan if state else "best"
    plan_name = plan_name or (trained if recovered else "best")
    if plan_name != "best" and widths != "plan":
        raise AdapruneError(f"--widths uniform re-plans the best trial's configuration; it cannot apply to "
                            f"{plan_name}: leave --widths at plan")
    chosen = session_plan(session, plan_name)  # refuses an unknown name, listing the saved ones
    if state and plan_name != trained and chosen != session_plan(session, trained):
        raise AdapruneError(f"the recovery was trained on {trained}, not {plan_name}: export {trained} "
                            f"with --recovered, or {plan_name} without it")
    loaded = load_configured(cfg, sink)
    plan = Plan.from_dict(chosen)
    if plan.params_before != count_params(loaded.model):
        raise AdapruneError(f"session {name!r}: its model {cfg.model!r} no longer matches the plan (parameter count)")
    meta = best.to_dict()  # what adaprune_plan.json says of the exported model
    if plan_name == "best":
        recipe = {"base model": cfg.model, "session": name, "trial": best.trial, "objective": f"{best.value:.4f}"}
    else:
        value = session.manifest().get("overrides_value") if plan_name == f"plan:{OVERRIDES_PLAN}" else None
        recipe = {"base model": cfg.model, "session": name, "plan": plan_name,
                  **({"objective": f"{value:.4f}"} if value is not None else {})}
        meta = {"plan_name": plan_name, "value": value, "params": best.params, "plan": chosen}
    if recovered:
        windows_for = SearchData(session, cfg, loaded, sink, control or Control()).repair_windows
        loaded.model, state = recovered_model(session, loaded.model, windows_for)
        plan = Plan.from_dict(session_plan(session, state.plan))
        c = state.config
        recipe["recovery"] = (f"LoRA r={c.rank} alpha={c.alpha} on {', '.join(c.targets)}, {state.step} "
                              f"steps of {c.batch_size}x{c.seq_len} tokens at lr {c.lr:g} on "
                              f"{', '.join(c.data)}, loss {loss_name(c)}; merged; "
                              f"validation PPL {state.valid_ppl_before:.2f} -> {state.valid_ppl_after:.2f}")
        meta = {**meta, "plan": plan.to_dict(),
                "recovery": {k: v for k, v in state.to_dict().items() if k != "history"}}
    elif widths == "uniform":
        control = control or Control()
        if cfg.overrides:
            sink(Log("uniform widths ignore the session's per-layer overrides", "warning"))
        cfg.overrides = {}
        loaded.model.requires_grad_(False)
        params = {**best.params, "first_kept": 0, "last_kept": 0, "allocation": "uniform", "ramp": 0.0}
        data = SearchData(session, cfg, loaded, sink, control)
        uniform, _ = prune_trial(loaded.model, data, cfg, TrialParams.from_dict(params), control, sink)
        plan = Plan.from_dict(uniform)
        with Stage(sink, "objective (uniform widths)"):
            value = progressive_objective(loaded.model, data.objective_sets(), control)
        sink(Log(f"uniform widths: objective {value:.3f} (the searched plan: {best.value:.3f})"))
        recipe.update(objective=f"{value:.4f} (uniform re-plan; searched plan {best.value:.4f})")
        meta = {**meta, "plan": uniform, "value": value, "widths": "uniform"}
    else:
        windows_for = SearchData(session, cfg, loaded, sink, control or Control()).repair_windows
        apply_stored_plan(loaded.model, plan, windows_for, control, sink)
    how = " and LoRA-recovered" if recovered else ""
    card = {"title": f"{cfg.model} pruned by {plan.removed / plan.params_before:.1%}{how} (adaprune search)",
            "recipe": {**recipe, **plan.recipe}}
    fmt = export(loaded.model, loaded.tokenizer, out, force, card, sink)
    (out / "adaprune_plan.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return fmt

