"""Run adaprune as a process (with crash points armed by environment) and check what a kill or a failed write
left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from engine.config import SearchConfig
from engine.search.study import open_study
from engine.session.store import Session

CLI = [sys.executable, "-c", "from tui.cli import main; main()"]


def adaprune(root: Path, *args, kill: str | None = None, fail: str | None = None) -> subprocess.CompletedProcess:
    """`adaprune ARGS` with sessions under `root`, killed at the point `kill` or failing a write at `fail`."""
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPRUNE_KILL_AT", "ADAPRUNE_FAIL_AT")}
    env.update(ADAPRUNE_SESSIONS=str(root), HF_HUB_OFFLINE="1", COLUMNS="200")
    if kill:
        env["ADAPRUNE_KILL_AT"] = kill
    if fail:
        env["ADAPRUNE_FAIL_AT"] = fail
    return subprocess.run([*CLI, *(str(a) for a in args)], env=env, capture_output=True, text=True, timeout=900)


def finished(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def killed(result: subprocess.CompletedProcess, point: str) -> None:
    assert result.returncode == -signal.SIGKILL, f"never reached {point}: rc {result.returncode}\n{result.stderr[-3000:]}"


def intact(root: Path, name: str) -> Session:
    """The session lists, and every JSON file in it parses."""
    r = adaprune(root, "sessions")
    assert r.returncode == 0 and name in r.stdout, r.stdout + r.stderr
    session = Session.open(root, name)
    for path in session.path.rglob("*.json"):
        if not path.name.startswith("."):
            json.loads(path.read_text(encoding="utf-8"))
    return session


def no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob(".*") if ".tmp" in p.name]
    assert not left, left


def trial_values(session: Session) -> dict[int, float]:
    study = open_study(session, SearchConfig.from_dict(session.config()))
    return {t.number: t.value for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"}


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, one line on stderr that starts with error: and holds `words`, and no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def make_tiny(folder: Path, tokenizer) -> Path:
    from conftest import make_model

    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def search_args(model: Path, name: str, trials: int) -> list:
    return ["search", "--session", name, "--model", model, "--trials", trials, "--objective-windows", 2,
            "--source", "stdlib-docs", "--objective", "stdlib-docs/valid", "--device", "cpu", "--no-early-stop"]
