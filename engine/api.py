"""The engine's one door: every job the CLI and the app run, typed configs in, typed results and events out.

`tui/` imports only this module, `engine.config`, `engine.events`, `engine.control` and `engine.errors`
(tests/test_hygiene.py holds it to that). Importing it is light — no torch, transformers or Optuna — so
`adaprune --help` and the sessions list start at once; each job imports its feature modules when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.bench.table import plot_png, plot_text, table, to_csv, to_markdown
from engine.config import BenchConfig, PruneConfig, RecoverConfig, SearchConfig
from engine.control import Control
from engine.events import Sink, null_sink
from engine.search.trial_rows import TrialRow, TrialRows
from engine.session.layout import RESULTS, best_record, recovery_state
from engine.session.store import Session, check_name, default_dir, list_sessions
from engine.session.summary import summary

if TYPE_CHECKING:
    from engine.oneshot import PruneResult
    from engine.prune.plan import Plan
    from engine.review import LayerRow

__all__ = [
    "BenchConfig", "PruneConfig", "RecoverConfig", "SearchConfig", "Session", "TrialRow", "TrialRows",
    "bench_results", "best_plan", "best_record", "check_edit", "check_name", "check_text_spec", "counts_of",
    "create_session", "default_dir", "export_session", "layer_rows", "list_sessions", "model_layers",
    "overrides_to_edits", "params_with", "plot_png", "plot_text", "prune", "recovery_state", "reevaluate",
    "run_bench", "run_recovery", "run_search", "summary", "table", "to_csv", "to_markdown",
    "validate_bench", "validate_recover", "validate_search", "warm_up",
]


# --- sessions -----------------------------------------------------------------------------------------------


def bench_results(session: Session) -> dict | None:
    """The session's benchmark table (bench.json), or None before the first `bench`."""
    return session.read_json(RESULTS)


def best_plan(session: Session) -> tuple[Plan | None, dict | None]:
    """The best trial's plan and its record ({"trial", "value", "params", "plan"}), or (None, None)."""
    from engine.prune.plan import Plan

    best = best_record(session)
    return (Plan.from_dict(best["plan"]), best) if best else (None, None)


def warm_up() -> None:
    """Import what the jobs and the layer review need (torch among them), e.g. in a background thread while a
    UI shows its first screen, so the first plan or form that needs them opens without a pause."""
    import engine.bench.run
    import engine.review
    import engine.search.driver  # noqa: F401


# --- checks before any heavy work -------------------------------------------------------------------------


def check_text_spec(spec: str) -> None:
    """Refuse a text spec (SOURCE[/SPLIT][:NxL]) that cannot be read."""
    from engine.data.text import parse_spec

    parse_spec(spec)


def model_layers(spec: str, trust_remote_code: bool = False, sink: Sink = null_sink) -> int:
    """The number of decoder layers of a model, from its config (no weights are loaded)."""
    from engine.model.load import num_layers

    return num_layers(spec, trust_remote_code, sink)


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
               worker: bool = False) -> dict:
    """Drive (or, as a worker, join) the session's search until its trial budget is spent."""
    from engine.search.driver import run_search as run

    return run(session, sink, control, worker)


def run_bench(session: Session, cfg: BenchConfig, sink: Sink = null_sink, control: Control | None = None) -> dict:
    from engine.bench.run import run_bench as run

    return run(session, cfg, sink, control)


def run_recovery(root: Path, name: str, cfg: RecoverConfig, sink: Sink = null_sink,
                 control: Control | None = None, resume: bool = False, restart: bool = False) -> dict:
    from engine.recover.train import run_recovery as run

    return run(root, name, cfg, sink, control, resume=resume, restart=restart)


def export_session(root: Path, name: str, out: Path, force: bool = False, sink: Sink = null_sink,
                   widths: str = "plan", control: Control | None = None, recovered: bool = False) -> str:
    """A session's plan as a Hugging Face folder; returns the format written."""
    from engine.session_export import export_session as export

    return export(root, name, out, force, sink, widths, control, recovered)


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
