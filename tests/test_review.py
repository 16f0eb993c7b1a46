"""Reviewing and overriding a plan (the app's Layers screen), and session rename/delete/follow."""

import json

import pytest
import torch
from conftest import make_model

from engine.config import SearchConfig
from engine.errors import AdapruneError
from engine.model.structure import count_params, layer_shapes
from engine.prune.importance import LayerScores
from engine.prune.plan import Plan, select
from engine.prune.recipe import Recipe, prune_with
from engine.prune.slicing import apply_plan
from engine.review import check_edit, counts_of, layer_rows, params_with, reevaluate
from engine.search.driver import create_session, run_search
from engine.search.study import open_study
from engine.session.store import Session


def _plan() -> Plan:
    model = make_model("llama", layers=4, heads=6, kv_heads=2, intermediate=64)
    return prune_with(model, Recipe(0.2, "l2", attn_share="same"), [1, 2])


def test_rows_and_edit_arithmetic_match_real_pruning():
    plan = _plan()
    rows = layer_rows(plan)
    assert [r.removed > 0 for r in rows] == [False, True, True, False]
    assert params_with(plan, {}) == plan.params_after
    assert rows[1].heads_per_group == 3 and rows[1].kv_kept == 2 and rows[1].channels == 64
    assert 0 < max(r.importance for r in rows) <= 1
    # lock layer 1 and cut layer 3 by hand: the arithmetic equals pruning the model with those counts
    edits = {1: (0, 0), 3: check_edit(plan, 3, 1, 10)}
    model = make_model("llama", layers=4, heads=6, kv_heads=2, intermediate=64)
    shapes = layer_shapes(model)
    counts = {**counts_of(plan), **edits}
    scores = {i: LayerScores(torch.rand(6), torch.rand(2), torch.rand(64)) for i in range(4)}
    apply_plan(model, select(shapes, scores, {i: kc for i, kc in counts.items() if kc != (0, 0)}, "query"))
    assert params_with(plan, edits) == count_params(model)
    assert [r.override for r in layer_rows(plan, edits)] == ["", "lock", "", "1/10"]
    with pytest.raises(AdapruneError, match="at least one query head"):
        check_edit(plan, 2, 3, 0)
    with pytest.raises(AdapruneError, match="channels"):
        check_edit(plan, 2, 0, 64)


@pytest.fixture
def searched(tmp_path, searched_template):
    return searched_template(tmp_path / "s", "rev")


def test_reevaluate_records_overrides_that_later_trials_respect(searched, monkeypatch):
    best = searched.read_json("plan.json")
    plan = Plan.from_dict(best["plan"])
    pruned = next(r.index for r in layer_rows(plan) if r.removed)
    out = reevaluate(searched, {pruned: (0, 0)})
    saved = json.loads((searched.path / "plans" / "overrides.json").read_text())
    assert saved["layers"][pruned]["keep_channels"] == list(range(64))  # locked layer kept whole
    assert abs(out["params_after"] - best["plan"]["params_after"]) < 0.01 * plan.params_before  # still on target
    assert searched.config()["overrides"] == {str(pruned): "lock"} and out["value"] > 0
    searched.update(config={**searched.config(), "trials": 3})
    import engine.search.driver as driver

    plans = []

    def watched(*args, **kwargs):
        out = driver_run_trial(*args, **kwargs)
        plans.append(out.plan)
        return out

    driver_run_trial = driver.run_trial
    monkeypatch.setattr(driver, "run_trial", watched)
    run_search(searched)  # the next trial respects the lock
    assert len(plans) == 1
    assert plans[0]["layers"][pruned]["keep_channels"] == list(range(64))  # the lock held in the new trial
    assert any(len(lp["keep_channels"]) < 64 for lp in plans[0]["layers"])  # and it still pruned elsewhere
    newest = max(open_study(searched, SearchConfig.from_dict(searched.config())).get_trials(),
                 key=lambda t: t.number)
    assert newest.state.name in ("COMPLETE", "PRUNED")


def test_export_writes_the_edited_plan_when_asked(searched, tmp_path):
    """A plan you edit is the plan you export: plan:overrides writes the re-evaluated edits, not the best."""
    from engine.model.load import load
    from engine.session_export import export_session

    best = searched.read_json("plan.json")
    plan = Plan.from_dict(best["plan"])
    pruned = next(r.index for r in layer_rows(plan) if r.removed)
    reevaluate(searched, {pruned: (0, 0)})
    edited = json.loads((searched.path / "plans" / "overrides.json").read_text())
    root = searched.path.parent
    for name, expected in (("best", best["plan"]), ("plan:overrides", edited)):
        out = tmp_path / name.replace(":", "-")
        export_session(root, searched.name, out, plan_name=name)
        written = json.loads((out / "adaprune_plan.json").read_text())
        assert written["plan"] == expected
        model = load(str(out), device="cpu", trust_remote_code=True).model
        assert count_params(model) == expected["params_after"]
        assert model.model.layers[pruned].mlp.down_proj.in_features == (64 if name != "best" else
                                                                        len(expected["layers"][pruned]["keep_channels"]))
    with pytest.raises(AdapruneError, match="no plan 'plan:nope'.*plan:overrides"):
        export_session(root, searched.name, tmp_path / "x", plan_name="plan:nope")
    with pytest.raises(AdapruneError, match="uniform re-plans the best"):
        export_session(root, searched.name, tmp_path / "y", widths="uniform", plan_name="plan:overrides")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_session_copied_on_disk_opens_and_listing_never_writes(searched):
    """`cp -r` of a session is a session of its own (its study found under the original's name); a folder
    still being copied (no study.db yet) lists with 0 trials and gets no study.db from the listing."""
    import shutil

    from engine.search.driver import run_search
    from engine.session.summary import summary

    root = searched.path.parent
    shutil.copytree(searched.path, root / "copy")
    copy = Session.open(root, "copy")
    assert summary(copy).done == 2 and summary(copy).best == summary(searched).best
    copy.update(config={**copy.config(), "trials": 3})
    run_search(copy)  # resumes in its own study file; the original is untouched
    assert summary(copy).done == 3 and summary(searched).done == 2
    half = root / "half"
    half.mkdir()
    shutil.copy(searched.path / "session.json", half / "session.json")
    row = summary(Session.open(root, "half"))
    assert row.done == 0 and "unreadable" not in row.status
    assert sorted(p.name for p in half.iterdir()) == ["session.json"]  # reading wrote nothing


def test_rename_delete_and_follow(searched, tmp_path):
    root = searched.path.parent
    events, offset = searched.follow_events(0)
    assert events and offset == searched.events_path.stat().st_size
    with searched.events_path.open("a") as f:
        f.write('{"kind": "log", "message": "half')  # a line still being written is not read yet
    more, offset2 = searched.follow_events(offset)
    assert more == [] and offset2 == offset
    moved = searched.rename("renamed")
    assert not (root / "rev").exists() and Session.open(root, "renamed").study_name == "rev"
    from engine.session.summary import summary

    assert summary(moved).done == 2  # the study is still found under its first name
    with pytest.raises(AdapruneError, match="exists already"):
        create_session(root, "other", SearchConfig.from_dict(moved.config())).rename("renamed")
    (moved.path / "lock").write_text(json.dumps({"pid": __import__("os").getpid(),
                                                  "host": __import__("socket").gethostname()}))
    with pytest.raises(AdapruneError, match="running"):
        moved.delete()
    (moved.path / "lock").unlink()
    moved.delete()
    assert not moved.path.exists()
