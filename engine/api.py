"""The engine's one door: every job the CLI and the app run, typed configs in, typed results and events out.

`tui/` imports only this module, `engine.config`, `engine.events`, `engine.control` and `engine.errors`
(tests/test_hygiene.py holds it to that). Importing it is light — no torch, transformers or Optuna — so
`adaprune --help` and the sessions list start at once; each job imports its feature modules when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.bench.table import mismatched, plot_png, plot_text, table, to_csv, to_markdown
from engine.config import BenchConfig, PruneConfig, RecoverConfig, SearchConfig
from engine.control import Control
from engine.data.text import HUB, STDLIB
from engine.events import Sink, null_sink
from engine.search.trial_rows import TrialRow, TrialRows
from engine.session.activity import Activity, Doing
from engine.session.layout import (
    OVERRIDES_PLAN,
    RESULTS,
    best_record,
    recovery_state,
    saved_plans,
    session_plan,
)
from engine.session.records import BestRecord, RecoveryState, SessionRow
from engine.session.requests import (
    JOBS,
    pause_pending,
    request,
    requested,
    resume_command,
    running_jobs,
    steer,
)
from engine.session.store import Session, check_name, default_dir, list_sessions
from engine.session.summary import summary

if TYPE_CHECKING:
    from engine.oneshot import PruneResult
    from engine.prune.plan import Plan
    from engine.review import LayerRow

HUB_TEXTS = tuple(HUB)  # text names read through `datasets` (they need the hub)
BUILTIN_TEXT = STDLIB  # the text shipped in the package

__all__ = [
    "Activity", "Doing", "BUILTIN_TEXT", "HUB_TEXTS", "BenchConfig", "BestRecord", "PruneConfig", "RecoverConfig",
    "RecoveryState", "SearchConfig", "Session", "SessionRow", "TrialRow", "TrialRows",
    "bench_results", "best_plan", "best_record", "check_edit", "check_name", "check_model", "check_text_spec", "counts_of",
    "create_session", "default_dir", "export_session", "layer_rows", "list_sessions", "known_depth", "mismatched", "memory_estimate", "model_layers",
    "overrides_to_edits", "params_with", "plan_summary", "plot_png", "plot_text", "prune", "recovery_state", "pause_pending", "request", "requested", "resume_command", "reevaluate", "JOBS", "running_jobs", "steer",
    "OVERRIDES_PLAN", "PlanChoice", "plan_choices", "run_bench", "run_recovery", "run_search", "saved_plans", "session_plan", "summary", "table", "to_csv", "to_markdown",
    "validate_bench", "validate_recover", "validate_search", "warm_up",
]


# --- sessions -----------------------------------------------------------------------------------------------


def bench_results(session: Session) -> dict | None:
    """The session's benchmark table (bench.json), or None before the first `bench`; a row whose model changed
    since it was measured (a new best, a re-trained recovery) carries "outdated": why."""
    return _mark_outdated(session, session.read_json(RESULTS))


def _mark_outdated(session: Session, results: dict | None) -> dict | None:
    from engine.bench.outdated import outdated_rows

    if results:
        for name, why in outdated_rows(session, results).items():
            results["rows"][name]["outdated"] = why
    return results


def best_plan(session: Session) -> tuple[Plan | None, BestRecord | None]:
    """The best trial's plan and its record, or (None, None)."""
    from engine.prune.plan import Plan

    best = best_record(session)
    return (Plan.from_dict(best.plan), best) if best else (None, None)


@dataclass(frozen=True)
class PlanChoice:
    """A plan a user can export, bench or recover: the best trial's, or a saved one."""

    name: str  # "best" or "plan:NAME"
    label: str
    plan: Plan
    value: float | None  # its objective, when measured


def plan_choices(session: Session) -> list[PlanChoice]:
    """The best trial's plan, then the re-evaluated edits (plan:overrides), then other saved plans."""
    from engine.prune.plan import Plan

    plan, best = best_plan(session)
    out = [PlanChoice("best", f"best trial {best.trial}", plan, best.value)] if best is not None else []
    for n in sorted(saved_plans(session), key=lambda n: (n != OVERRIDES_PLAN, n)):
        edited = n == OVERRIDES_PLAN
        value = session.manifest().get("overrides_value") if edited else None
        out.append(PlanChoice(f"plan:{n}", "your edited plan (plan:overrides)" if edited else f"plan:{n}",
                              Plan.from_dict(session_plan(session, f"plan:{n}")), value))
    return out


def plan_summary(plan) -> str:
    """A plan in one line, in what it keeps."""
    from engine.review import plan_summary as summary

    return summary(plan)


def warm_up() -> None:
    """Import what the jobs and the layer review need (torch among them), e.g. in a background thread while a
    UI shows its first screen, so the first plan or form that needs them opens without a pause."""
    import engine.bench.run
    import engine.review
    import engine.search.driver  # noqa: F401


# --- checks before any heavy work -------------------------------------------------------------------------


def check_text_spec(spec: str, role: str = "calib") -> None:
    """Refuse a text spec (SOURCE[/SPLIT][:NxL]) that cannot be read: a missing, empty, binary or malformed
    file, an unknown source name, a split that does not exist."""
    from engine.data.text import check_source

    check_source(spec, role)  # type: ignore[arg-type]


def check_model(spec: str) -> str:
    """Refuse a model spec that names nothing (a path typo, a folder without a supported config), without
    loading anything; the kind it names otherwise (embedded, gguf, folder, hub)."""
    from engine.model.spec import check_model as check

    return check(spec)


def model_layers(spec: str, trust_remote_code: bool = False, sink: Sink = null_sink) -> int:
    """The number of decoder layers of a model, from its config (no weights are loaded)."""
    from engine.model.load import num_layers

    return num_layers(spec, trust_remote_code, sink)


def known_depth(spec: str) -> int | None:
    """A model's number of layers when it can be read at once (a folder's config, a converted .gguf's), else
    None; never loads, converts or downloads (a form checks a layer range with it as the user types)."""
    from engine.model.spec import known_depth as depth

    return depth(spec)


def memory_estimate(model: str, device: str, metrics: list[str], repair: bool = True) -> str | None:
    """A search's memory plan in one line, when the model's config is at hand (nothing loaded); None else.
    Torch is not imported for it: "auto" is a GPU only when torch is loaded already and sees one."""
    from engine.model.memory import job_plan, loaded_cuda
    from engine.model.spec import known_config

    config = known_config(model)
    if config is None:
        return None
    gpu = device.startswith("cuda") or (device == "auto" and loaded_cuda() is not None)
    where = (device if ":" in device else "cuda:0") if gpu else "cpu"
    plan = job_plan(config, where, "bfloat16" if gpu else "float32", "search", set(metrics), repair,
                    repair_cache=SearchConfig.repair_cache_gb * 2**30)
    return plan.problem() or plan.text()


def validate_search(cfg: SearchConfig, n_layers: int | None = None) -> None:
    from engine.search.space import validate

    validate(cfg, n_layers)


def validate_recover(cfg: RecoverConfig) -> None:
    from engine.recover.train import validate

    validate(cfg)


def validate_bench(cfg: BenchConfig):
    """Task files row by row and PPL texts readable; returns the parsed tasks and texts."""
    from engine.bench.run import validate

    return validate(cfg)


# --- jobs ---------------------------------------------------------------------------------------------------


def prune(cfg: PruneConfig, sink: Sink = null_sink, control: Control | None = None) -> PruneResult:
    """`adaprune prune`: one fixed recipe, dense against pruned, optionally exported."""
    from engine.oneshot import prune as run

    return run(cfg, sink, control)


def create_session(root: Path, name: str, cfg: SearchConfig, sink: Sink = null_sink) -> Session:
    """A new session folder and study, with trial 0 (LLM-Pruner's recipe) queued."""
    from engine.search.driver import create_session as create

    return create(root, name, cfg, sink)


def run_search(session: Session, sink: Sink = null_sink, control: Control | None = None,
               worker: bool = False, since: float | None = None) -> dict:
    """Drive (or, as a worker, join) the session's search until its trial budget is spent; pause and cancel
    requests (from any process) made before `since` (default: now) are not for this run."""
    from engine.search.driver import run_search as run

    return run(session, sink, control, worker, since)


def run_bench(session: Session, cfg: BenchConfig, sink: Sink = null_sink, control: Control | None = None,
              since: float | None = None) -> dict:
    """The benchmark table after measuring; rows not measured again this time carry "outdated" as in
    `bench_results`."""
    from engine.bench.run import run_bench as run

    return _mark_outdated(session, run(session, cfg, sink, control, since))


def run_recovery(root: Path, name: str, cfg: RecoverConfig, sink: Sink = null_sink,
                 control: Control | None = None, resume: bool = False, restart: bool = False,
                 since: float | None = None) -> dict:
    from engine.recover.train import run_recovery as run

    return run(root, name, cfg, sink, control, resume=resume, restart=restart, since=since)


def export_session(root: Path, name: str, out: Path, force: bool = False, sink: Sink = null_sink,
                   widths: str = "plan", control: Control | None = None, recovered: bool = False,
                   plan_name: str | None = None) -> str:
    """A session's plan (best, or plan:NAME) as a Hugging Face folder; returns the format written."""
    from engine.session_export import export_session as export

    return export(root, name, out, force, sink, widths, control, recovered, plan_name)



# --- review of a plan, layer by layer -----------------------------------------------------------------------


def layer_rows(plan: Plan, edits: dict[int, tuple[int, int]] | None = None) -> list[LayerRow]:
    from engine.review import layer_rows as rows

    return rows(plan, edits)


def counts_of(plan: Plan) -> dict[int, tuple[int, int]]:
    from engine.review import counts_of as counts

    return counts(plan)


def params_with(plan: Plan, edits: dict[int, tuple[int, int]]) -> int:
    from engine.review import params_with as params

    return params(plan, edits)


def check_edit(plan: Plan, layer: int, heads_removed: int, channels_removed: int) -> tuple[int, int]:
    from engine.review import check_edit as check

    return check(plan, layer, heads_removed, channels_removed)


def overrides_to_edits(overrides: dict, plan: Plan) -> dict[int, tuple[int, int]]:
    from engine.review import overrides_to_edits as edits

    return edits(overrides, plan)


def reevaluate(session: Session, edits: dict[int, tuple[int, int]], sink: Sink = null_sink,
               control: Control | None = None, dense=None) -> dict:
    """Re-plan the best configuration with the user's per-layer edits, score it, save it as plans/overrides."""
    from engine.review import reevaluate as run

    return run(session, edits, sink, control, dense)
