"""Zero-shot accuracy through lm-evaluation-harness, on the model in memory.

Tasks are lm-eval's own by their standard names (they need the Hugging Face hub), or local JSONL files run
as lm-eval custom tasks so that the scoring (acc, acc_norm) is lm-eval's and not ours. Local rows are
`{"query", "choices", "gold"}` (each choice scored as a continuation after one space) or, WinoGrande-style,
`{"contexts", "continuation", "gold"}` (the continuation scored after each context).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Sink, Stage, null_sink

# the LLM-Pruner / AdaPruner protocol, by lm-eval's names
STANDARD_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
LOCAL_SUFFIXES = (".jsonl", ".json")


@dataclass
class TaskSpec:
    name: str  # the column name in tables
    path: Path | None  # a local file, or None for an lm-eval task by name
    kind: str = "choices"  # choices (query/choices/gold) or partial (contexts/continuation/gold)
    rows: int = 0
    sha256: str = ""


@dataclass
class TaskResult:
    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    n: int
    source: str  # lm-eval task name, or the local file and its sha256
    limit: int | None
    seed: int
    lm_eval_version: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Rows:
    kinds: set[str] = field(default_factory=set)
    count: int = 0


def parse_task(spec: str) -> TaskSpec:
    """`piqa` (lm-eval, hub), `path/to/piqa.jsonl` (local, named by its stem) or `NAME=path.jsonl`."""
    name, _, path = spec.partition("=")
    if not path and spec.endswith(LOCAL_SUFFIXES):
        name, path = Path(spec).stem, spec
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise AdapruneError(f"task file {p} does not exist: give a JSONL file of query/choices/gold rows")
        kind, rows, digest = check_task_file(p)
        return TaskSpec(name or p.stem, p, kind, rows, digest)
    if spec not in STANDARD_TASKS and not _lm_eval_knows(spec):
        raise AdapruneError(f"unknown task {spec!r}: use one of {', '.join(STANDARD_TASKS)}, another lm-eval task "
                            f"name, or a local .jsonl file")
    return TaskSpec(spec, None)


_MANAGERS: dict[bool, object] = {}


def _manager(with_builtin: bool):
    """lm-eval's task index, built once per process: its built-in tasks take ~10 s to index, local ones none."""
    if with_builtin not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[with_builtin] = TaskManager(include_defaults=with_builtin)
    return _MANAGERS[with_builtin]


def _lm_eval_knows(name: str) -> bool:
    return name in _manager(True).all_tasks


def check_task_file(path: Path) -> tuple[str, int, str]:
    """Validate every row before any model time is spent; name the first bad line."""
    data = path.read_bytes()
    rows = _Rows()
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdapruneError(f"{where}: not JSON ({e.msg}); each line must be one task row") from None
        if not isinstance(row, dict):
            raise AdapruneError(f"{where}: a row must be a JSON object")
        if "contexts" in row:
            kind, options = "partial", row.get("contexts")
            if not isinstance(row.get("continuation"), str):
                raise AdapruneError(f"{where}: a WinoGrande-style row needs a \"continuation\" string")
        else:
            kind, options = "choices", row.get("choices")
            if not isinstance(row.get("query"), str):
                raise AdapruneError(f"{where}: missing \"query\" string (or \"contexts\" for WinoGrande-style rows)")
        label = "contexts" if kind == "partial" else "choices"
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise AdapruneError(f"{where}: \"{label}\" must be a list of at least two strings")
        gold = row.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
            raise AdapruneError(f"{where}: \"gold\" must be an index 0..{len(options) - 1} into \"{label}\", "
                                f"not {gold!r}")
        rows.kinds.add(kind)
        rows.count += 1
    if not rows.count:
        raise AdapruneError(f"task file {path} has no rows")
    if len(rows.kinds) > 1:
        raise AdapruneError(f"task file {path} mixes query/choices rows and contexts/continuation rows: split it")
    return rows.kinds.pop(), rows.count, hashlib.sha256(data).hexdigest()


def task_config(spec: TaskSpec) -> dict | str:
    """The lm-eval task: its name, or a custom-task config reading the local file through `datasets`."""
    if spec.path is None:
        return spec.name
    config = {
        "task": f"adaprune_{spec.name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(spec.path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if spec.kind == "partial":  # lm-eval's multiple-input form: doc_to_text gives the gold index
        # as lm-eval's winogrande: the continuation follows each context after one space
        config.update(doc_to_text="gold", doc_to_choice="contexts", doc_to_target="{{continuation | trim}}")
    else:
        config.update(doc_to_text="query", doc_to_choice="choices", doc_to_target="gold")
    return config


def sample_indices(n_rows: int, limit: int | None, seed: int, exclude: set[int] | frozenset = frozenset()
                   ) -> list[int] | None:
    """A fixed-seed random subset, never touching `exclude` (None: every row). lm-eval's own --limit takes the
    first rows, which are often not typical."""
    allowed = [i for i in range(n_rows) if i not in exclude]
    if limit is None or limit >= len(allowed):
        return allowed if exclude else None
    return sorted(random.Random(seed).sample(allowed, limit))


def _progress_lm(model, tokenizer, batch_size: int, control: Control, stage: Stage):
    """lm-eval's HF wrapper around our model, reporting progress and obeying cancel between chunks."""
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        chunk = 64

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = []
            stage.total = len(requests)
            for start in range(0, len(requests), self.chunk):
                control.checkpoint()
                out += super().loglikelihood(requests[start : start + self.chunk], disable_tqdm=True)
                stage.advance(len(out))
            return out

    return ProgressLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def zero_shot(model, tokenizer, tasks: list[TaskSpec], limit: int | None = None, seed: int = 0,
              batch_size: int = 8, control: Control | None = None, sink: Sink = null_sink,
              label: str = "", indices: list[int] | None = None,
              exclude: set[int] | frozenset = frozenset()) -> dict[str, TaskResult]:
    """Accuracy per task: `limit` rows drawn with `seed` (None: every row), never the `exclude` rows (e.g. those
    a search's objective saw); or exactly the rows in `indices`."""
    import lm_eval
    from lm_eval.evaluator import simple_evaluate

    control = control or Control()
    results: dict[str, TaskResult] = {}
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task logging would scroll over the display
    manager = _manager(any(spec.path is None for spec in tasks))
    version = getattr(lm_eval, "__version__", "?")
    was_training = model.training
    model.eval()
    try:
        for spec in tasks:
            with Stage(sink, f"zero-shot {spec.name}" + (f" ({label})" if label else ""), None, "requests") as st:
                lm = _progress_lm(model, tokenizer, batch_size, control, st)
                cfg = task_config(spec)
                key = cfg["task"] if isinstance(cfg, dict) else cfg
                try:
                    # lm-eval's `samples` picks rows by index; the seeded subset is the same for every model
                    n_rows = spec.rows or _rows_of(manager, cfg)
                    picked = indices if indices is not None else sample_indices(n_rows, limit, seed, exclude)
                    with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's and datasets' tqdm bars
                        out = simple_evaluate(model=lm, tasks=[cfg], task_manager=manager,
                                              samples={key: picked} if picked is not None else None,
                                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed, bootstrap_iters=1000, log_samples=False)
                except (ConnectionError, OSError, ValueError) as e:
                    if spec.path is not None:
                        raise
                    raise AdapruneError(f"task {spec.name!r} needs the Hugging Face hub, which failed "
                                        f"({type(e).__name__}): give a local .jsonl task file instead") from None
            r = out["results"][key]
            results[spec.name] = TaskResult(
                spec.name, float(r["acc,none"]), _num(r.get("acc_stderr,none")), _num(r.get("acc_norm,none")),
                len(picked) if picked is not None else n_rows,
                f"{spec.path} sha256:{spec.sha256[:16]}" if spec.path else f"lm-eval:{spec.name}",
                limit, seed, version)
    finally:
        model.train(was_training)
    return results


def _rows_of(manager, cfg) -> int:
    from lm_eval.tasks import get_task_dict

    task = next(iter(get_task_dict([cfg], manager).values()))
    return len(task.eval_docs)


def _num(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
