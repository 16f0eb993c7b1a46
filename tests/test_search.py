"""The adaptive search: sessions on disk, trial 0, duplicates, resume after a kill, workers, bad input."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.config import SearchConfig
from engine.control import Control
from engine.errors import AdapruneError, Cancelled
from engine.events import SearchFinished, StageStarted, TrialFinished, TrialStarted
from engine.prune.reconstruct import Repair
from engine.search.data import pick_windows
from engine.search.driver import create_session, run_search
from engine.search.params import TrialParams
from engine.search.space import baseline_params, canonical, space, suggest
from engine.search.study import open_study
from engine.search.trial_rows import TrialRows
from engine.session.store import Session
from engine.session.study import completed, quiet_optuna
from engine.session.summary import summary


@pytest.fixture
def llama_folder(tmp_path, tokenizer):
    from conftest import make_model

    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _cfg(folder, **kw) -> SearchConfig:
    base = SearchConfig(model=str(folder), trials=4, objective_windows=2, pool_size=12, device="cpu",
                        sources=["stdlib-docs", "self"], objective=["stdlib-docs/valid", "self"])
    return replace(base, **kw)


def _trials(session, cfg):
    return open_study(session, cfg).get_trials(deepcopy=False)


def test_search_records_everything_in_the_session(llama_folder, tmp_path):
    cfg = _cfg(llama_folder)
    session = create_session(tmp_path / "s", "run1", cfg)
    assert session.path.stat().st_mode & 0o777 == 0o700  # the user's text and samples: theirs alone
    events = []
    result = run_search(session, events.append)
    assert result["completed"] == 4
    trials = _trials(session, cfg)
    assert trials[0].params == baseline_params(cfg, 4) and trials[0].user_attrs["baseline"]
    best = json.loads((session.path / "plan.json").read_text())
    assert best["value"] == min(t.value for t in trials if t.value is not None and t.state.name == "COMPLETE")
    logged, bad = session.read_events()
    assert not bad and sum(e["kind"] == "trial_finished" for e in logged) >= 4
    assert any(e.get("message", "").startswith("memory, about: peak") for e in logged)  # said up front
    assert session.manifest()["status"] == "done"
    kinds = sorted({p.name.split("-")[0] for p in session.stats_dir.iterdir()})
    # trial 1 (obs, the strongest fixed recipe) always builds its scores; per-sample statistics when TPE asks;
    # the self text both the pool and the objective sample, as one draw
    # the pools' input moments, shared with workers (the tiny model's fit the repair cache's budget), and their
    # windows' input norms (wanda's)
    assert kinds in (["moments", "norms", "objective", "obs", "pool", "self"],
                     ["moments", "norms", "objective", "obs", "pool", "samples", "self"])
    assert all(p.suffix == ".safetensors" for p in session.stats_dir.iterdir())  # no build lock left
    row = summary(session)
    assert row.done == 4 and row.best == pytest.approx(best["value"])
    # the best plan exports and loads
    from engine.model.load import load
    from engine.session_export import export_session

    export_session(tmp_path / "s", "run1", tmp_path / "best")
    assert load(str(tmp_path / "best"), device="cpu").model is not None
    # uniform widths: re-planned with the same cut everywhere, a standard config plain transformers loads
    # (MLP channels only: transformers 5 refuses a standard config whose heads do not divide the hidden size)
    session.write_json("plan.json", {**best, "params": {**best["params"], "attn_share": "auto"}})
    plan = best["plan"]
    assert export_session(tmp_path / "s", "run1", tmp_path / "uniform", widths="uniform") == "uniform"
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform")
    widths = {layer.mlp.gate_proj.out_features for layer in plain.model.layers}
    assert len(widths) == 1 and abs(sum(p.numel() for p in plain.parameters()) - plan["params_after"]) < \
        0.01 * plan["params_before"]


def test_duplicates_are_not_evaluated_again(llama_folder, tmp_path):
    # everything that matters fixed but last_kept (0 or 1): only two distinct configurations exist
    fixed = {"calib_source": "stdlib-docs", "calib_n": 10, "calib_len": 64, "calib_select": "low-loss",
             "calib_seed": 0, "metric": "l2", "aggregate": "sum", "attn_share": "auto", "first_kept": 0,
             "metric2": "none", "ramp": 0.0, "allocation": "uniform", "repair": "none"}
    # mix and repair_lambda stay free: without a second metric or a repair they cannot matter
    cfg = _cfg(llama_folder, trials=5, fixed=fixed)
    session = create_session(tmp_path / "s", "dups", cfg)
    events = []
    run_search(session, events.append)
    finished = [e for e in events if isinstance(e, TrialFinished)]
    evaluated = [e for e in finished if e.state in ("complete", "pruned")]
    assert len(evaluated) == 2 and {e.params["last_kept"] for e in evaluated} == {0, 1}
    assert any(e.state == "duplicate" for e in finished)


def test_resume_after_kill_reruns_the_interrupted_trial(llama_folder, tmp_path):
    cfg = _cfg(llama_folder, trials=3)
    session = create_session(tmp_path / "s", "crash", cfg)
    study = open_study(session, cfg)
    # what a kill -9 leaves: a RUNNING trial owned by a dead process, and its stale lock
    t = study.ask()  # trial 0, the queued baseline
    orphan = suggest(t, space(cfg, 4), {})
    t.set_user_attr("worker", f"999999999@{__import__('socket').gethostname()}")
    (session.path / "lock").write_text(json.dumps({"pid": 999999999, "host": __import__("socket").gethostname()}))
    with session.lock():
        run_search(session)
    trials = _trials(session, cfg)
    assert trials[0].state.name == "FAIL"
    assert completed(open_study(session, cfg)) == 3
    assert any(t.user_attrs.get("rerun_of") == 0 and t.params == orphan and t.state.name == "COMPLETE"
               and t.user_attrs.get("baseline") for t in trials)  # the rerun baseline is still the baseline


def test_a_second_driver_is_refused(llama_folder, tmp_path):
    session = create_session(tmp_path / "s", "busy", _cfg(llama_folder))
    (session.path / "lock").write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))
    with pytest.raises(AdapruneError, match=f"driven by pid {os.getpid()}"), session.lock():
        pass


def test_cancel_between_trials_leaves_a_resumable_session(llama_folder, tmp_path):
    cfg = _cfg(llama_folder, trials=3)
    session = create_session(tmp_path / "s", "stop", cfg)
    control = Control()

    def sink(e):
        if isinstance(e, TrialFinished):
            control.cancel()

    with pytest.raises(Cancelled):
        run_search(session, sink, control)
    assert session.manifest()["status"] == "cancelled"
    assert completed(open_study(session, cfg)) == 1
    run_search(session)
    assert completed(open_study(session, cfg)) == 3


def test_a_trial_cancelled_midway_is_reported_finished_not_left_running(llama_folder, tmp_path):
    cfg = _cfg(llama_folder, trials=3)
    session = create_session(tmp_path / "s", "mid", cfg)
    control, seen = Control(), []

    def sink(e):
        seen.append(e)
        if isinstance(e, TrialStarted) and e.number == 1:
            control.cancel()  # inside trial 1: it stops at its next safe point

    with pytest.raises(Cancelled):
        run_search(session, sink, control)
    ended = [e for e in seen if isinstance(e, TrialFinished) and e.number == 1]
    assert [(e.state, "runs again" in e.message) for e in ended] == [("failed", True)]
    board = TrialRows()
    for e in seen:
        board.apply(e)
    assert board.rows[1].state == "failed"  # the table that follows the log says so too


def test_cancel_while_the_data_is_prepared_says_cancelled(llama_folder, tmp_path):
    """Before the first trial (a calibration pool, self text): the session reads "cancelled" and the log ends
    with how the run ended, as a cancel inside a trial does, not "stopped" as if the process had died."""
    cfg = _cfg(llama_folder, trials=3)
    session = create_session(tmp_path / "s", "early", cfg)
    control, seen = Control(), []

    def sink(e):
        seen.append(e)
        if isinstance(e, StageStarted) and e.stage.startswith("calibration pool"):
            control.cancel()

    with pytest.raises(Cancelled):
        run_search(session, sink, control)
    assert session.manifest()["status"] == "cancelled"
    assert isinstance(seen[-1], SearchFinished) and (seen[-1].status, seen[-1].completed) == ("cancelled", 0)
    run_search(session)
    assert completed(open_study(session, cfg)) == 3


def test_same_seed_proposes_the_same_trials(llama_folder, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = _cfg(llama_folder, trials=4, early_stop=False, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
        session = create_session(tmp_path / "s", name, cfg)
        run_search(session)
        runs.append([t.params for t in _trials(session, cfg)])
    assert runs[0] == runs[1]


def test_two_workers_share_one_study_exactly(llama_folder, tmp_path):
    cfg = _cfg(llama_folder, trials=6, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    root = tmp_path / "s"
    session = create_session(root, "shared", cfg)
    env = {**os.environ, "ADAPRUNE_SESSIONS": str(root)}
    cmd = [sys.executable, "-c", "from tui.cli import main; main()", "worker", "shared"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    trials = _trials(session, cfg)
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and "duplicate_of" not in t.user_attrs]
    assert len(counted) == 6
    keys = [t.user_attrs["key"] for t in counted]
    assert len(keys) == len(set(keys))  # no configuration evaluated twice
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both took part


def test_trials_stop_by_successive_halving_over_the_objectives_batches(llama_folder, tmp_path):
    """Rungs at 1 and 2 batches (of 4): a trial goes on only while in the better half measured there; the last
    batch is never a stopping point (the whole objective is known by then); --no-early-stop stops nothing."""
    from engine.model.load import load
    from engine.search.objective import Pruned, progressive_objective

    cfg = _cfg(llama_folder, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    study = open_study(create_session(tmp_path / "s", "sh", cfg), cfg)

    def run(values: list[float]) -> int:
        """Report a trial's running values; the batches it ran before being stopped (all when not)."""
        with quiet_optuna():
            trial = study.ask()
        for done, v in enumerate(values, 1):
            trial.report(v, done)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                return done
        study.tell(trial, values[-1])
        return len(values)

    from optuna.trial import TrialState

    assert run([10, 10, 10]) == 3  # alone at every rung
    assert run([20, 20, 20]) == 1  # worse than the only other at the first rung
    assert run([9, 12, 9]) == 2  # better at 1 batch, worse at 2
    assert run([8, 8, 50]) == 3  # no rung at 3 batches
    none = open_study(create_session(tmp_path / "s", "all", replace(cfg, early_stop=False)),
                      replace(cfg, early_stop=False))
    with quiet_optuna():
        trial = none.ask()
    trial.report(1e9, 1)
    assert not trial.should_prune()

    dense = load(str(llama_folder), device="cpu")
    windows = torch.randint(0, 100, (12, 16))
    asked = []
    value = progressive_objective(dense.model, {"a": windows}, Control(), lambda d, v: asked.append(d) or False)
    assert asked == [1, 2] and value > 1  # 3 batches of 4: asked after the first two only
    with pytest.raises(Pruned) as stopped:
        progressive_objective(dense.model, {"a": windows}, Control(), lambda d, v: True)
    assert (stopped.value.done, stopped.value.steps) == (1, 3)


def test_the_baseline_stands_in_the_rungs_and_runs_whole(llama_folder, tmp_path):
    """Successive halving compares trials with the baseline's values too (LLM-Pruner's recipe is a trial like
    the others), and the baseline itself is never stopped."""
    cfg = _cfg(llama_folder, trials=2, objective_windows=8, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    session = create_session(tmp_path / "s", "rungs", cfg)
    run_search(session)
    base = next(t for t in _trials(session, cfg) if t.user_attrs.get("baseline"))
    assert base.state.name == "COMPLETE" and "completed_rung_0" in base.system_attrs


def test_pick_windows():
    ids = torch.arange(40).view(8, 5)
    loss = torch.tensor([5.0, 1.0, 3.0, 7.0, 2.0, 6.0, 4.0, 0.0])
    assert pick_windows(ids, loss, 2, 3, "low-loss", 0)[:, 0].tolist() == [35, 5]
    assert pick_windows(ids, loss, 2, 5, "high-loss", 0)[:, 0].tolist() == [15, 25]
    assert pick_windows(ids, loss, 3, 5, "spread", 0)[:, 0].tolist() == [35, 30, 15]
    a = pick_windows(ids, loss, 4, 5, "random", 1)
    assert torch.equal(a, pick_windows(ids, loss, 4, 5, "random", 1)) and a.shape == (4, 5)


def test_canonical_ignores_what_cannot_matter():
    p = {"calib_select": "low-loss", "calib_seed": 3, "metric": "taylor1"}
    assert canonical(p) == canonical({**p, "calib_seed": 7})
    assert canonical({**p, "calib_select": "random"}) != canonical({**p, "calib_select": "random", "calib_seed": 7})
    g = {**p, "allocation": "global", "ramp": 0.25}
    assert canonical(g) == canonical({**g, "ramp": -0.5})  # the ranking, not the ramp, sets the widths
    assert canonical({**g, "allocation": "uniform"}) != canonical({**g, "allocation": "uniform", "ramp": -0.5})
    assert canonical(p, {}) == canonical(p) != canonical(p, {"3": "lock"})  # locking a layer makes another model


def test_bad_sessions(llama_folder, tmp_path):
    root = tmp_path / "s"
    with pytest.raises(AdapruneError, match="at least one trial"):
        create_session(root, "x", _cfg(llama_folder, trials=0))
    all_fixed = dict(baseline_params(_cfg(llama_folder), 32))
    with pytest.raises(AdapruneError, match="nothing left to search"):
        create_session(root, "x", _cfg(llama_folder, fixed=all_fixed))
    with pytest.raises(AdapruneError, match="not a search dimension"):
        create_session(root, "x", _cfg(llama_folder, fixed={"colour": 1}))
    assert not (root / "x").exists()
    with pytest.raises(AdapruneError, match="no session 'nope'"):
        Session.open(root, "nope")
    s = create_session(root, "newer", _cfg(llama_folder))
    data = json.loads(s.manifest_path.read_text())
    s.manifest_path.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(AdapruneError, match="newer adaprune"):
        Session.open(root, "newer")
    s.manifest_path.write_text("{ not json")
    with pytest.raises(AdapruneError, match="corrupt"):
        Session.open(root, "newer")
    ok = create_session(root, "events", _cfg(llama_folder))
    ok.events_path.write_text('{"kind": "log", "message": "a"}\n{broken\n{"kind": "log", "message": "b"}\n')
    events, bad = ok.read_events()
    assert [e["message"] for e in events] == ["a", "b"] and bad == [2]


def test_search_respects_a_locked_layer(llama_folder, tmp_path):
    cfg = _cfg(llama_folder, trials=3, overrides={"1": "lock"}, sources=["stdlib-docs"],
               objective=["stdlib-docs/valid"])
    session = create_session(tmp_path / "s", "locked", cfg)
    events = []
    run_search(session, events.append)
    best = json.loads((session.path / "plan.json").read_text())
    layer1 = best["plan"]["layers"][1]
    assert len(layer1["keep_heads"]) == 6 and len(layer1["keep_channels"]) == 64


@pytest.mark.parametrize("metric", ["taylor1", "taylor2"])
def test_a_trial_mixing_two_metrics(llama_folder, tmp_path, metric):
    from engine.model.load import load
    from engine.search.data import SearchData
    from engine.search.trial import run_trial

    cfg = _cfg(llama_folder, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    session = create_session(tmp_path / "s", "mix", cfg)
    dense = load(str(llama_folder), device="cpu")
    data = SearchData(session, cfg, dense, lambda e: None, Control())
    params = {**baseline_params(cfg, 4), "metric": metric, "metric2": "wanda", "mix": 0.5}
    out = run_trial(dense, data, cfg, TrialParams.from_dict(params), None, Control(), lambda e: None)
    assert out.state == "complete" and out.plan["recipe"]["metric2"] == "wanda"
    assert out.params_after < 77232


def test_trials_share_the_dense_weights_and_never_write_into_them(llama_folder, tmp_path):
    """A trial prunes a copy whose weights are the dense model's memory (no second model): every metric kind,
    with and without the repair, leaves the dense weights bit for bit as loaded."""
    from engine.model.load import load
    from engine.model.structure import decoder_layers
    from engine.prune.slicing import shared_copy
    from engine.search.data import SearchData
    from engine.search.trial import run_trial

    cfg = _cfg(llama_folder, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    session = create_session(tmp_path / "s", "shared", cfg)
    dense = load(str(llama_folder), device="cpu")
    before = {k: v.clone() for k, v in dense.model.state_dict().items()}
    copied = shared_copy(dense.model)
    layer, twin = decoder_layers(dense.model)[0].mlp.down_proj, decoder_layers(copied)[0].mlp.down_proj
    assert twin.weight.data_ptr() == layer.weight.data_ptr() and twin.weight is not layer.weight
    assert copied.lm_head.weight is copied.model.embed_tokens.weight or not dense.model.config.tie_word_embeddings
    data = SearchData(session, cfg, dense, lambda e: None, Control())
    base = baseline_params(cfg, 4)
    for metric, repair in (("taylor1", "none"), ("taylor2", "stdlib-docs"), ("wanda", "none"), ("obs", "all")):
        params = {**base, "metric": metric, "repair": repair, "attn_share": "0.25", "first_kept": 0}
        out = run_trial(dense, data, cfg, TrialParams.from_dict(params), None, Control(), lambda e: None)
        assert out.state == "complete" and out.params_after < 77232, (metric, out.message)
        after = dense.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), metric
        assert all(p.grad is None for p in dense.model.parameters()), metric  # the trial's gradients are its own


def test_per_sample_statistics_cover_the_windows_trials_use_and_equal_a_whole_pool_pass(llama_folder, tmp_path):
    from engine.events import StageStarted
    from engine.model.load import load
    from engine.prune.importance import collect_sample_stats
    from engine.search.data import SearchData

    cfg = _cfg(llama_folder, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    session = create_session(tmp_path / "s", "lazy", cfg)
    dense = load(str(llama_folder), device="cpu")
    events = []
    data = SearchData(session, cfg, dense, events.append, Control())

    def windows_computed() -> list[int]:
        return [e.total for e in events if isinstance(e, StageStarted) and e.stage == "per-sample statistics"]

    data.sample_stats("stdlib-docs", 64, torch.tensor([3, 1, 7]))
    data.sample_stats("stdlib-docs", 64, torch.tensor([1, 7]))  # nothing new
    stats = data.sample_stats("stdlib-docs", 64, torch.tensor([7, 8, 0]))
    assert windows_computed() == [3, 2]
    # a resumed worker reads the windows computed so far and computes only the rest
    again = SearchData(session, cfg, dense, events.append, Control())
    resumed = again.sample_stats("stdlib-docs", 64, torch.tensor([0, 1, 2, 3]))
    assert windows_computed() == [3, 2, 1]
    ids = data.pool("stdlib-docs")[0][:, :64]
    whole = collect_sample_stats(dense.model, ids)
    rows = [0, 1, 2, 3, 7, 8]
    for k, v in whole.items():
        torch.testing.assert_close(resumed[k][rows], v[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats[k][[0, 1, 3, 7, 8]], v[[0, 1, 3, 7, 8]], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("repaired", [True, False])
def test_wanda_reads_the_pools_own_pass_and_needs_no_backward(llama_folder, tmp_path, repaired):
    """Each window's input norms come with the pool's pass (the layer-wise one that also gathers the repair's
    moments, or a plain forward), at every window length, equal to a per-window pass; a wanda trial (alone or
    as a second metric) then computes no per-sample statistics."""
    from engine.events import StageStarted
    from engine.model.load import load
    from engine.prune.importance import collect_sample_stats
    from engine.search.data import SearchData
    from engine.search.trial import run_trial

    extra = {} if repaired else {"repair_sources": [], "metrics": ["taylor1", "wanda"]}
    cfg = _cfg(llama_folder, sources=["stdlib-docs"], objective=["stdlib-docs/valid"], **extra)
    session = create_session(tmp_path / "s", "norms", cfg)
    dense = load(str(llama_folder), device="cpu")
    events = []
    data = SearchData(session, cfg, dense, events.append, Control())
    ids = data.pool("stdlib-docs")[0]
    for length in (64, 128):
        norms = data.window_norms("stdlib-docs", length)
        whole = collect_sample_stats(dense.model, ids[:, :length])
        acts = {k: v for k, v in whole.items() if k.endswith(".act")}
        assert acts and set(norms) == set(acts)
        for k, v in acts.items():
            torch.testing.assert_close(norms[k], v, rtol=1e-4, atol=1e-5)
    params = {**baseline_params(cfg, 4), "metric": "wanda", "first_kept": 0, "calib_len": 128}
    mixed = {**params, "metric": "taylor1", "metric2": "wanda"}
    for p in (params, mixed):
        out = run_trial(dense, data, cfg, TrialParams.from_dict(p), None, Control(), events.append)
        assert out.state == "complete"
    stages = {e.stage for e in events if isinstance(e, StageStarted)}
    assert "per-sample statistics" not in stages and "activation norms stdlib-docs" not in stages
    # a session whose pool was built before norms were kept: one forward pass over the pool, the same norms
    for f in session.stats_dir.glob("norms-*"):
        f.unlink()
    again = SearchData(session, cfg, dense, events.append, Control())
    torch.testing.assert_close(again.window_norms("stdlib-docs", 64), data.window_norms("stdlib-docs", 64))
    assert "activation norms stdlib-docs" in {e.stage for e in events if isinstance(e, StageStarted)}


def test_the_pool_and_the_objective_sample_self_text_in_one_draw(llama_folder, tmp_path):
    from engine.data.windows import sample_self
    from engine.events import StageStarted
    from engine.model.load import load
    from engine.search.data import SearchData

    cfg = _cfg(llama_folder)
    session = create_session(tmp_path / "s", "joint", cfg)
    dense = load(str(llama_folder), device="cpu")
    events = []
    data = SearchData(session, cfg, dense, events.append, Control())
    data.prepare()
    draws = [e for e in events if isinstance(e, StageStarted) and e.stage.startswith("sample self text")]
    assert len(draws) == 1 and draws[0].total == cfg.pool_size + cfg.objective_windows
    both = sample_self(dense.model, dense.tokenizer, cfg.pool_size + cfg.objective_windows, 128, cfg.seed)
    assert torch.equal(data.pool("self")[0], both[: cfg.pool_size])
    assert torch.equal(data.objective_sets()["self"], both[cfg.pool_size:])


def test_a_session_is_listed_only_once_its_study_exists(llama_folder, tmp_path, monkeypatch):
    import engine.search.driver as driver
    from engine.session.store import list_sessions

    seen = []
    real = driver.open_study

    def listing_meanwhile(session, cfg, *a):  # what the app's sessions list sees while the study is made
        seen.append([s.name for s in list_sessions(tmp_path / "s")])
        return real(session, cfg, *a)

    monkeypatch.setattr(driver, "open_study", listing_meanwhile)
    create_session(tmp_path / "s", "new", _cfg(llama_folder))
    assert seen == [[]] and [s.name for s in list_sessions(tmp_path / "s")] == ["new"]
    monkeypatch.setattr(driver, "open_study", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        create_session(tmp_path / "s", "broken", _cfg(llama_folder))
    assert not (tmp_path / "s" / "broken").exists()  # nothing half-made is left


def test_sessions_listing_survives_damaged_sessions(llama_folder, tmp_path):
    from typer.testing import CliRunner

    from tui.cli import app

    root = tmp_path / "s"
    good = create_session(root, "good", _cfg(llama_folder))
    good.events_path.write_text('{"kind": "log", "message": "a"}\nnot json\n')
    broken = create_session(root, "broken", _cfg(llama_folder))
    broken.manifest_path.write_text("{")
    edited = create_session(root, "edited", _cfg(llama_folder))
    data = json.loads(edited.manifest_path.read_text())
    data["config"]["trails"] = 5  # a hand edit with a typo: named, not silently dropped
    edited.manifest_path.write_text(json.dumps(data))
    r = CliRunner().invoke(app, ["sessions", "--sessions-dir", str(root)])
    assert r.exit_code == 0, r.output
    assert "good" in r.stdout and "broken" in r.stdout and "unreadable" in r.stdout
    assert "line(s) 2 corrupt" in r.stderr and "broken" in r.stderr
    assert "unknown search setting(s) trails" in r.stderr
    with pytest.raises(AdapruneError, match="unknown search setting"):
        SearchConfig.from_dict(data["config"])


def test_a_trial_whose_worker_died_on_another_host_is_rerun(llama_folder, tmp_path):
    import sqlalchemy

    cfg = _cfg(llama_folder, trials=2)
    session = create_session(tmp_path / "s", "remote", cfg)
    study = open_study(session, cfg)
    t = study.ask()  # trial 0, taken by a worker on another machine that lost power before it drew params
    t.set_user_attr("worker", "4242@another-host")
    study._storage.record_heartbeat(t._trial_id)
    engine = sqlalchemy.create_engine(f"sqlite:///{session.path / 'study.db'}")
    with engine.begin() as c:  # its last heartbeat: an hour ago
        c.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')"))
    with session.lock():
        run_search(session)
    trials = _trials(session, cfg)
    assert trials[0].state.name == "FAIL"
    assert any(x.user_attrs.get("rerun_of") == 0 and x.state.name == "COMPLETE" for x in trials)
    assert completed(open_study(session, cfg)) == 2


def test_a_live_remote_trial_is_left_alone(llama_folder, tmp_path):
    from engine.search.study import fail_orphans

    cfg = _cfg(llama_folder, trials=2)
    session = create_session(tmp_path / "s", "alive", cfg)
    study = open_study(session, cfg)
    t = study.ask()
    t.set_user_attr("worker", "4242@another-host")
    study._storage.record_heartbeat(t._trial_id)  # beating now
    assert fail_orphans(study) == 0
    assert study.get_trials()[0].state.name == "RUNNING"


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on a unix socket (skipped where PostgreSQL or root is missing)."""
    import shutil
    import socket

    bindir = next((d for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None) \
        if Path("/usr/lib/postgresql").is_dir() else None
    if bindir is None or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs PostgreSQL's binaries and root (to run the server as the postgres user)")
    pytest.importorskip("psycopg2")
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="adaprune-pg-"))  # pytest's own tmp is root-only; postgres must enter
    shutil.chown(data, "postgres", "postgres")
    data.chmod(0o700)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def as_postgres(*cmd):
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, text=True)

    as_postgres(str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust")
    as_postgres(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
                f"-p {port} -k {data} -c listen_addresses=''", "start")
    try:
        as_postgres(str(bindir / "createdb"), "-h", str(data), "-p", str(port), "adaprune")
        yield f"postgresql+psycopg2://postgres@/adaprune?host={data}&port={port}"
    finally:
        as_postgres(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def test_workers_share_a_postgresql_study(llama_folder, tmp_path, postgres):
    """The across-machines storage: a PostgreSQL URL; two workers, exact count, nothing run twice."""
    cfg = _cfg(llama_folder, trials=5, sources=["stdlib-docs"], objective=["stdlib-docs/valid"], storage=postgres)
    root = tmp_path / "s"
    session = create_session(root, "pg", cfg)
    assert not (session.path / "study.db").exists()
    env = {**os.environ, "ADAPRUNE_SESSIONS": str(root)}
    cmd = [sys.executable, "-c", "from tui.cli import main; main()", "worker", "pg"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    counted = [t for t in _trials(session, cfg)
               if t.state.name in ("COMPLETE", "PRUNED") and "duplicate_of" not in t.user_attrs]
    keys = [t.user_attrs["key"] for t in counted]
    assert len(counted) == 5 and len(keys) == len(set(keys))
    assert summary(session).done == 5


def test_repaired_trials_are_what_exports_and_benchmarks_rebuild(llama_folder, tmp_path):
    """A trial's objective is measured on the repaired model; the export is that very model."""
    from engine.model.load import load
    from engine.search.data import SearchData
    from engine.search.objective import progressive_objective
    from engine.search.trial import trial_repair
    from engine.session_export import export_session

    cfg = _cfg(llama_folder, trials=3, fixed={"repair": "self", "repair_n": 8, "repair_lambda": 0.3})
    session = create_session(tmp_path / "s", "rep", cfg)
    run_search(session)
    best = json.loads((session.path / "plan.json").read_text())
    # --fix holds trial 0 too, so every trial (the best among them) was repaired
    assert best["plan"]["repair"] == trial_repair(TrialParams.from_dict(best["params"]), cfg).to_dict()
    # the first 8 windows of the self pool the calibration already drew: no draw of its own
    assert best["plan"]["repair"] == {"calib": "self:12x128", "lam": 0.3, "mode": "dense", "seed": 0, "take": 8}
    assert not any(p.name.startswith("repair-") for p in session.stats_dir.iterdir())
    export_session(tmp_path / "s", "rep", tmp_path / "out")
    exported = load(str(tmp_path / "out"), device="cpu")
    assert sum(p.numel() for p in exported.model.parameters()) == best["plan"]["params_after"]
    dense = load(str(llama_folder), device="cpu")
    data = SearchData(session, cfg, dense, lambda e: None, Control())
    value = progressive_objective(exported.model, data.objective_sets(), Control())
    assert value == pytest.approx(best["value"], rel=1e-4)


def test_the_baseline_stays_inside_a_narrowed_space(llama_folder, tmp_path):
    """Searching only some metrics (the form's checkboxes) must not put trial 0 outside Optuna's choices."""
    import optuna

    cfg = _cfg(llama_folder, metrics=["vector", "wanda"], trials=1, sources=["stdlib-docs"],
               objective=["stdlib-docs/valid"])
    base = baseline_params(cfg, 4)
    assert base["metric"] == "vector" and base["aggregate"] == "sum" and base["calib_n"] == 10
    sp = space(cfg, 4)
    for key, value in base.items():
        choices = sp[key]
        assert (choices[0] <= value <= choices[1]) if isinstance(choices, tuple) else value in choices, key
    session = create_session(tmp_path / "s", "narrow", cfg)
    study = open_study(session, cfg)
    params = suggest(study.ask(), sp, cfg.fixed)  # trial 0 as the driver asks for it: no ValueError
    assert params["metric"] == "vector" and study.trials[0].user_attrs["baseline"]
    assert isinstance(study, optuna.Study)


def test_obs_trials_score_from_every_pool_and_repair_from_them_all(llama_folder, tmp_path):
    """An obs trial reads every source's whole pool together: its scores are built once per session (stats/),
    from the same input moments a repair from all pools solves from; the export is the model it measured."""
    from engine.model.load import load
    from engine.search.data import SearchData
    from engine.session_export import export_session

    cfg = _cfg(llama_folder, trials=2, metrics=["obs"], fixed={"metric": "obs", "repair": "all", "repair_lambda": 0.3})
    assert "all" in space(cfg, 4)["repair"]
    session = create_session(tmp_path / "s", "obs", cfg)
    run_search(session)
    trials = [t for t in _trials(session, cfg) if t.state.name == "COMPLETE"]
    assert trials
    assert len([p for p in session.stats_dir.iterdir() if p.name.startswith("obs-")]) == 1
    best = json.loads((session.path / "plan.json").read_text())
    joined = "stdlib-docs:12x128+self:12x128"
    assert best["plan"]["recipe"]["metric"] == "obs"
    assert best["plan"]["recipe"]["calib"] == f"{joined} (every pool)"
    assert best["plan"]["repair"] == {"calib": joined, "lam": 0.3, "mode": "dense", "seed": 0, "take": None}
    dense = load(str(llama_folder), device="cpu")
    data = SearchData(session, cfg, dense, lambda e: None, Control())
    windows = data.repair_windows(Repair.from_dict(best["plan"]["repair"]))
    assert torch.equal(windows, torch.cat([data.pool("stdlib-docs")[0], data.pool("self")[0]]))
    export_session(tmp_path / "s", "obs", tmp_path / "out")
    exported = load(str(tmp_path / "out"), device="cpu")
    assert sum(p.numel() for p in exported.model.parameters()) == best["plan"]["params_after"]
    # the settings obs does not read cannot make two configurations differ
    p = {"metric": "obs", "calib_source": "self", "calib_n": 10, "calib_seed": 1, "aggregate": "max",
         "calib_select": "random", "calib_len": 64}
    assert canonical(p) == canonical({**p, "calib_n": 32, "calib_seed": 4, "aggregate": "sum", "calib_len": 128,
                                      "calib_source": "stdlib-docs"})
    assert canonical({**p, "metric": "taylor1"}) != canonical({**p, "metric": "taylor1", "calib_n": 32})


def test_trial_1_is_the_strongest_fixed_recipe_when_the_space_holds_it(llama_folder, tmp_path):
    """obs with a repair from every pool is queued right after LLM-Pruner's recipe, inside the space; a space
    without obs queues only the baseline."""
    from engine.search.space import warm_start_params

    cfg = _cfg(llama_folder, trials=2)
    warm = warm_start_params(cfg, 4)
    assert warm["metric"] == "obs" and warm["repair"] == "all" and warm["attn_share"] == "auto"
    sp = space(cfg, 4)
    assert all(v in sp[k] if not isinstance(sp[k], tuple) else sp[k][0] <= v <= sp[k][1] for k, v in warm.items())
    session = create_session(tmp_path / "s", "warm", cfg)
    run_search(session)
    first = sorted(_trials(session, cfg), key=lambda t: t.number)[:2]
    assert first[0].user_attrs.get("baseline") and first[0].params["metric"] == "taylor1"
    assert first[1].user_attrs.get("warm_start") and first[1].params["metric"] == "obs"
    assert warm_start_params(_cfg(llama_folder, metrics=["taylor1", "wanda"]), 4) is None
    single = warm_start_params(_cfg(llama_folder, sources=["stdlib-docs"]), 4)
    assert single["repair"] == "stdlib-docs"


def test_a_trial_out_of_memory_fails_with_its_reason_and_the_search_goes_on(llama_folder, tmp_path, monkeypatch):
    import engine.search.driver as driver

    real, calls = driver.run_trial, []

    def tight(dense, data, cfg, params, *rest):
        calls.append(params)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(dense, data, cfg, params, *rest)

    monkeypatch.setattr(driver, "run_trial", tight)
    cfg = _cfg(llama_folder, trials=3, sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    session = create_session(tmp_path / "s", "oom", cfg)
    events = []
    run_search(session, events.append)
    trials = _trials(session, cfg)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].user_attrs["error"].startswith("out of memory: CUDA out of memory")
    assert completed(open_study(session, cfg)) == 3  # the budget is still met
    assert any(isinstance(e, TrialFinished) and e.state == "failed" and "out of memory" in e.message for e in events)

    def never(*_):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(driver, "run_trial", never)
    again = create_session(tmp_path / "s", "oom2", cfg)
    with pytest.raises(AdapruneError, match="5 trials in a row failed .*out of memory.*then resume"):
        run_search(again)
    assert again.manifest()["status"] == "failed"


def test_two_workers_started_together_build_each_one_time_artifact_once(llama_folder, tmp_path):
    """A worker started beside another waits for the calibration pools, objective texts, self-sampled text and
    obs scores the other builds (counted by the writes both make), instead of building them again."""
    from collections import Counter

    cfg = _cfg(llama_folder, trials=4)  # stdlib-docs and self text, in the pools and the objective
    root = tmp_path / "s"
    session = create_session(root, "pair", cfg)
    log = tmp_path / "writes.log"
    env = {**os.environ, "ADAPRUNE_SESSIONS": str(root), "ADAPRUNE_FAULT_LOG": str(log)}
    cmd = [sys.executable, "-c", "from tui.cli import main; main()", "worker", "pair"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    writes = Counter(Path(line.split(" ", 1)[1].strip()).name for line in log.read_text().splitlines()
                     if line.startswith("write ") and "/stats/" in line)
    once = {name: n for name, n in writes.items() if not name.startswith("samples-")}
    assert once and all(n == 1 for n in once.values()), writes
    assert {n.split("-")[0] for n in once} >= {"pool", "objective", "self", "moments"}, writes
    # the repair's input moments too: one pass per pool over both processes (they were per process)
    assert sum(e["kind"] == "stage_started" and e["stage"].startswith("reconstruction statistics")
               for e in session.read_events()[0]) == len(cfg.sources)
    events, _ = session.read_events()
    started = Counter(e["stage"] for e in events if e["kind"] == "stage_started")
    assert started["sample self text (calibration and objective)"] == 1
    one_time = {k: n for k, n in started.items() if k.startswith(("calibration pool", "objective text", "obs"))}
    assert len(one_time) >= 3 and set(one_time.values()) == {1}, started  # the builder's stage, nobody else's
    assert any(e["kind"] == "log" and "to build" in e["message"] for e in events)  # one waited, and said so
    # every line names its process, so an attached viewer tells the two workers' stages apart
    pids = {str(p.pid) for p in procs}
    assert {e["by"].partition("@")[0] for e in events if e["kind"].startswith("stage")} == pids
    assert completed(open_study(session, cfg)) == 4
    assert session.manifest()["status"] == "done"  # no driver ran it: the workers that finished it say so


def test_resuming_a_finished_search_loads_nothing_and_keeps_it_done(searched_template, tmp_path, monkeypatch):
    import engine.search.driver as driver

    session = searched_template(tmp_path / "s", "fin")
    session.update(status="cancelled")  # e.g. a resume of it stopped while it loaded the model, before this fix

    def loaded(*_a, **_k):
        raise AssertionError("a finished search loaded its model")

    monkeypatch.setattr(driver, "load_configured", loaded)
    result = run_search(session)
    assert result["already_done"] and result["completed"] == 2
    assert session.manifest()["status"] == "done"


def test_a_damaged_best_plan_is_rebuilt_from_the_study_when_the_search_resumes(searched_template, tmp_path):
    from engine.events import Log
    from engine.session.layout import best_record

    session = searched_template(tmp_path / "s", "damaged")
    saved = best_record(session)
    (session.path / "plan.json").write_text('{"trial": 1, "val')  # e.g. a disk that filled up mid-write
    logs = []
    result = run_search(session, lambda e: logs.append(e.message) if isinstance(e, Log) else None)
    assert result["completed"] == 2 and session.manifest()["status"] == "done"
    assert best_record(session) == saved
    assert any("plan (plan.json) cannot be read: rebuilding it" in m for m in logs)


def test_a_search_of_workers_alone_is_steered_and_says_how_it_ended(llama_folder, tmp_path):
    """No driver, no lock: the sessions list says running (then paused) from the log's live worker, a cancel
    reaches it, and the session says cancelled (was left "created"); one whose workers died says stopped."""
    import time

    from engine.session.requests import steer
    from engine.session.summary import summary

    cfg = _cfg(llama_folder, trials=200)
    root = tmp_path / "s"
    session = create_session(root, "solo", cfg)
    env = {**os.environ, "ADAPRUNE_SESSIONS": str(root)}
    cmd = [sys.executable, "-c", "from tui.cli import main; main()", "worker", "solo"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if completed(open_study(session, cfg)) >= 2:
                break
            time.sleep(0.1)
        assert summary(session).status == "running"
        steer(session, "pause")
        for _ in range(300):
            if summary(session).status == "paused":
                break
            time.sleep(0.1)
        assert summary(session).status == "paused"
        steer(session, "cancel")
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0 or "cancelled" in err
    assert session.manifest()["status"] == "cancelled" and summary(session).status == "cancelled"
    session.update(status="created")  # as a worker killed before it could say so leaves it
    assert summary(session).status == "stopped"
