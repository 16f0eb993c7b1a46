"""Who is doing what, folded from a session's events log that several processes write."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.api import create_session
from engine.config import SearchConfig
from engine.errors import AdapruneError
from engine.events import StageProgress, StageStarted, event_from_dict
from engine.session.activity import HOST, Activity, me
from engine.session.summary import summary


def ev(kind: str, by: str, **fields) -> dict:
    return {"kind": kind, "by": by, "t": fields.pop("t", 0.0), **fields}


def test_each_process_keeps_its_own_innermost_stage():
    a, b = "11@far", "22@far"
    act = Activity().feed([
        ev("stage_started", a, stage="trials", total=4, t=1),
        ev("trial_started", a, number=3, params={}),
        ev("stage_started", a, stage="calibration pool self", t=2),
        ev("stage_started", a, stage="reconstruction statistics 48x128", total=30, t=3),
        ev("stage_progress", b, stage="sample self text", done=5, total=64, t=4),  # its start was not read
        ev("stage_progress", a, stage="reconstruction statistics 48x128", done=7, total=30, t=5),
    ])
    doing = {d.by: d for d in act.doing()}
    assert doing[a].stage.stage == "reconstruction statistics 48x128" and doing[a].stage.done == 7
    assert doing[a].trial == 3 and doing[b].trial is None
    assert doing[b].line("here") == "process 22 on far: sample self text 5/64"
    assert doing[a].line("far") == "process 11 (trial 3): reconstruction statistics 48x128 7/30"
    assert [d.by for d in act.doing()] == [b, a]  # the most recently started stage first
    # the outer stage ends and takes the inner one with it (a failure unwinds them all)
    act.apply(ev("stage_finished", a, stage="calibration pool self", seconds=1.0, outcome="failed"))
    assert {d.by: d for d in act.doing()}[a].stage is None  # still on its trial, between stages
    act.apply(ev("trial_finished", a, number=3, state="failed", value=None, params={}))
    act.apply(ev("search_finished", b, status="done", completed=4, total=4))
    assert act.doing() == []


def test_a_dead_process_on_this_host_is_not_doing_anything():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{gone.stdout.strip()}@{HOST}"
    act = Activity().feed([ev("stage_started", dead, stage="obs scores"), ev("stage_started", me(), stage="prune")])
    assert [d.by for d in act.doing()] == [me()]
    assert {d.by for d in act.doing(alive_only=False)} == {dead, me()}


def test_the_log_names_the_process_of_every_event_and_the_listing_says_what_it_does(tmp_path):
    session = create_session(tmp_path, "s", SearchConfig(trials=2))  # the embedded model: nothing is loaded
    assert summary(session).status == "created" and summary(session).doing == []
    sink = session.logged(lambda e: None, "search")
    sink(StageStarted("per-sample statistics self x64", 64))
    sink(StageProgress("per-sample statistics self x64", 12, 64))
    events, _ = session.read_events()
    assert {e["by"] for e in events} == {me()}
    assert event_from_dict(events[0]).by == me()
    pid = me().partition("@")[0]
    assert summary(session).status == "running"  # by a worker alone (no driver marked it)
    assert summary(session).doing == [f"process {pid} (search): per-sample statistics self x64 12/64"]


def test_pause_and_cancel_reach_a_search_that_workers_alone_run(tmp_path):
    from engine.session.requests import requested, running_jobs, steer

    session = create_session(tmp_path, "w", SearchConfig(trials=2))
    with pytest.raises(AdapruneError, match="nothing of session 'w' is running now"):
        steer(session, "pause")
    session.logged(lambda e: None, "search")(StageStarted("obs scores"))  # this process, as a worker would
    assert running_jobs(session)["search"]["workers"] == [me()]
    job, holder = steer(session, "pause")
    assert job == "search" and holder["pid"] == int(me().partition("@")[0])
    assert requested(session, "search")["command"] == "pause"
