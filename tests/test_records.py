"""A session's records read back as types: exactly, and strictly (a damaged or foreign file is named)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import RecoverConfig
from engine.errors import AdapruneError
from engine.session.layout import best_record, recovery_state, write_best, write_recovery_state
from engine.session.records import BestRecord, RecoveryState
from engine.session.store import Session

DATA = Path(__file__).parent / "data"


@pytest.fixture
def session(tmp_path) -> Session:
    (tmp_path / "s").mkdir()
    return Session(tmp_path / "s")


def test_best_record_round_trips_and_refuses_foreign_keys(session):
    assert best_record(session) is None
    stored = json.loads((DATA / "plan.json").read_text())
    write_best(session, BestRecord.from_dict(stored))
    back = best_record(session)
    assert back == BestRecord(stored["trial"], stored["value"], stored["params"], stored["plan"])
    assert json.loads((session.path / "plan.json").read_text()) == stored  # the file format is unchanged

    session.write_json("plan.json", {**stored, "widths": "uniform"})
    with pytest.raises(AdapruneError, match=r"unknown key\(s\) widths in .*plan.json"):
        best_record(session)
    session.write_json("plan.json", {k: v for k, v in stored.items() if k != "value"})
    with pytest.raises(AdapruneError, match=r"plan.json lacks value"):
        best_record(session)
    session.write_json("plan.json", [1, 2])
    with pytest.raises(AdapruneError, match="not a JSON object"):
        best_record(session)


def test_recovery_state_round_trips_with_its_config_typed(session):
    stored = json.loads((DATA / "recovery_state.json").read_text())
    state = RecoveryState.from_dict(stored)
    assert isinstance(state.config, RecoverConfig) and state.config == RecoverConfig.from_dict(stored["config"])
    assert state.progress() == "done" and state.data == stored["data"]
    write_recovery_state(session, state)
    # as stored, with what older versions left out said: the first layout's checkpoint, a newer setting's default
    written = json.loads((session.path / "recovery" / "state.json").read_text())
    assert written == {**stored, "checkpoint": None, "config": {**stored["config"], "distil": 0.0}}
    assert recovery_state(session) == state

    # the first layout named no checkpoint folder: still read (the checkpoint is recovery/ itself)
    old = {k: v for k, v in stored.items() if k != "checkpoint"}
    session.write_json("recovery/state.json", {**old, "status": "stopped", "step": 40})
    state = recovery_state(session)
    assert state.checkpoint is None and state.progress() == f"stopped 40/{stored['config']['steps']}"

    session.write_json("recovery/state.json", {**stored, "config": {**stored["config"], "rnak": 4}})
    with pytest.raises(AdapruneError, match="unknown recovery setting.*rnak"):
        recovery_state(session)
    session.write_json("recovery/state.json", {k: v for k, v in stored.items() if k != "step"})
    with pytest.raises(AdapruneError, match=r"state.json lacks step"):
        recovery_state(session)


def test_trial_params_take_the_defaults_of_newer_dimensions_and_refuse_unknown_ones():
    from engine.config import SearchConfig
    from engine.search.params import TrialParams
    from engine.search.space import baseline_params

    base = baseline_params(SearchConfig(model="m"), 30)
    assert TrialParams.from_dict(base).to_dict() == base  # every dimension of today's space is a field
    older = {k: v for k, v in base.items() if k not in ("metric2", "mix", "allocation", "ramp", "repair",
                                                         "repair_lambda", "repair_n")}
    p = TrialParams.from_dict(older)  # a session from before those dimensions: pruned as it was then
    assert (p.metric2, p.allocation, p.ramp, p.repair) == ("none", "uniform", 0.0, "none") and not p.mixing
    assert TrialParams.from_dict({**base, "metric2": "wanda"}).mixing
    assert not TrialParams.from_dict({**base, "metric2": base["metric"]}).mixing  # mixing a metric with itself
    with pytest.raises(AdapruneError, match="unknown search dimension.*calib_size"):
        TrialParams.from_dict({**base, "calib_size": 3})
    with pytest.raises(AdapruneError, match="lacks metric"):
        TrialParams.from_dict({k: v for k, v in base.items() if k != "metric"})


def test_the_listing_names_a_damaged_record_and_still_lists_the_session(tmp_path):
    from engine.config import SearchConfig
    from engine.search.driver import create_session
    from engine.session.summary import summary

    session = create_session(tmp_path, "s", SearchConfig(trials=2))  # the embedded model: nothing is loaded
    assert summary(session).problem is None
    stored = json.loads((DATA / "plan.json").read_text())
    session.write_json("plan.json", {**stored, "foo": 1})
    row = summary(session)
    assert row.status == "created" and "unknown key(s) foo" in row.problem and "plan.json" in row.problem
    session.write_json("recovery/state.json", {"foo": 1})
    row = summary(session)
    assert row.recovery == "unreadable" and "plan.json" in row.problem and "state.json" in row.problem
