"""Benchmarks: lm-eval zero-shot on local task files, the per-session comparison table, its files and errors."""

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import make_model
from typer.testing import CliRunner

from engine.bench.run import run_bench
from engine.bench.table import plot_png, plot_text, to_csv, to_markdown
from engine.config import BenchConfig, SearchConfig
from engine.errors import AdapruneError
from engine.measure.zeroshot import parse_task, sample_indices, zero_shot
from engine.search.driver import create_session, run_search
from tui.cli import app

WORDS = ["pruning", "heads", "channels", "tokens", "layers", "model", "data", "text"]


def _choice_rows(n: int) -> list[dict]:
    return [{"query": f"Question: which word {i}?\nAnswer:", "choices": [WORDS[i % 8], WORDS[(i + 3) % 8]],
             "gold": i % 2} for i in range(n)]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@torch.inference_mode()
def _logprob(model, tok, context: str, continuation: str) -> float:
    """Sum log-probability of `continuation` after `context`, computed here without lm-eval."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_zero_shot_is_lm_evals_accuracy_on_local_files(tmp_path, tokenizer):
    model = make_model("llama")
    rows = _choice_rows(12)
    spec = parse_task(_write(tmp_path / "words.jsonl", rows))
    assert (spec.name, spec.kind, spec.rows) == ("words", "choices", 12)
    r = zero_shot(model, tokenizer, [spec])["words"]
    expect = sum(max(range(2), key=lambda c: _logprob(model, tokenizer, row["query"], " " + row["choices"][c]))
                 == row["gold"] for row in rows) / len(rows)
    assert r.n == 12 and math.isclose(r.acc, expect) and r.acc_norm is not None
    assert "sha256:" in r.source and r.lm_eval_version

    # WinoGrande-style: one continuation scored after each context
    partial = [{"contexts": [f"The {WORDS[i % 8]} is", f"The {WORDS[(i + 1) % 8]} is"], "continuation": "small",
                "gold": i % 2} for i in range(6)]
    wspec = parse_task(f"wino={_write(tmp_path / 'w.jsonl', partial)}")
    w = zero_shot(model, tokenizer, [wspec])["wino"]
    expect = sum(max(range(2), key=lambda c: _logprob(model, tokenizer, row["contexts"][c], " small"))
                 == row["gold"] for row in partial) / len(partial)
    assert wspec.kind == "partial" and math.isclose(w.acc, expect)

    # --limit: a seeded random subset, the same for every model
    limited = zero_shot(model, tokenizer, [spec], limit=5, seed=3)["words"]
    assert limited.n == 5 and limited.limit == 5
    assert sample_indices(12, 5, 3) == sample_indices(12, 5, 3) != sample_indices(12, 5, 4)


def test_bad_task_files_name_the_line(tmp_path):
    good = _choice_rows(3)
    cases = [
        ([*good, "not json"], "3" if False else ":4: not JSON"),
        ([*good, {"query": "q", "choices": ["a", "b"], "gold": 2}], ":4: \"gold\" must be an index 0..1"),
        ([*good, {"query": "q", "gold": 0}], ":4: \"choices\" must be a list"),
        ([*good, {"choices": ["a", "b"], "gold": 0}], ":4: missing \"query\""),
        ([*good, {"contexts": ["a", "b"], "continuation": "c", "gold": 0}], "mixes"),
    ]
    for i, (rows, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        with pytest.raises(AdapruneError, match=message.replace("(", r"\(")):
            parse_task(str(path))
    with pytest.raises(AdapruneError, match="does not exist"):
        parse_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(AdapruneError, match="boolq, piqa, hellaswag, winogrande"):
        parse_task("no_such_task_anywhere")


@pytest.fixture
def searched(tmp_path, searched_template):
    return searched_template(tmp_path / "s", "b")


def test_session_table_rows_files_and_merging(searched, tmp_path, text_file):
    tasks = _write(tmp_path / "words.jsonl", _choice_rows(6))
    cfg = BenchConfig(tasks=[tasks], ppl=[str(text_file)], seq_lens=[32, 64], ppl_windows=3)
    run_bench(searched, cfg)
    # a second run adds measures to some rows and keeps the first run's numbers
    res = run_bench(searched, BenchConfig(speed=True, batches=[1, 2], rows=["dense", "best"]))
    rows = res["rows"]
    assert set(rows) == {"dense", "best", "magnitude", "random", "baseline", "oneshot", "oneshot-repaired"}
    # prune's defaults, and with its repair: MLP channels first, the sequential repair on self text, counted
    one, rep = rows["oneshot"], rows["oneshot-repaired"]
    assert one["recipe"]["attn_share"] == "auto" and one["recipe"]["calib"] == "stdlib-docs:10x64"
    assert rep["plan"]["repair"]["calib"] == "self:128x128" and rep["plan"]["repair"]["mode"] == "sequential"
    assert rep["params"] == rep["plan"]["params_after"]
    assert abs(rep["params"] - one["params"]) < 0.01 * rows["dense"]["params"]
    best = rows["best"]["params"]
    assert rows["magnitude"]["params"] == rows["random"]["params"] == best < rows["dense"]["params"]
    assert rows["magnitude"]["recipe"]["metric"] == "l2" and rows["random"]["recipe"]["metric"] == "random"
    assert rows["baseline"]["recipe"]["metric"] == "taylor1"
    for r in rows.values():
        assert set(r["ppl"]) == {f"{text_file}@32", f"{text_file}@64"} and r["ppl"][f"{text_file}@32"]["windows"] == 3
        assert 0 <= r["zeroshot"]["words"]["acc"] <= 1 and r["env"]["lm_eval"]
    for r in (rows["dense"], rows["best"]):
        assert r["speed"]["prefill_tok_s"].keys() == {"1", "2"} and r["memory_mib"] > 0
    assert "speed" not in rows["random"]
    md, csv = to_markdown(res), to_csv(res)
    assert "| retention |" in md.replace("retention |", "retention |") and "| dense | " in md
    assert "lm-eval" in md and "sha256" in md
    assert csv.splitlines()[0].startswith("row,params,params %") and len(csv.splitlines()) == 8
    plot_png(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "vs parameters" in plot_text(res)

    # derived plans are saved and reused, not re-derived
    more = run_bench(searched, BenchConfig(ppl=["stdlib-docs"], seq_lens=[32], ppl_windows=2, rows=["dense", "baseline"]))
    assert "words" in more["rows"]["baseline"]["zeroshot"] and "stdlib-docs@32" in more["rows"]["baseline"]["ppl"]
    assert more["rows"]["baseline"]["plan_id"] == rows["baseline"]["plan_id"]

    # a new best plan: the best row's old numbers describe another model and are dropped
    plan = json.loads((searched.path / "plan.json").read_text())
    plan["plan"]["recipe"]["note"] = "changed"
    (searched.path / "plan.json").write_text(json.dumps(plan))
    again = run_bench(searched, BenchConfig(ppl=["stdlib-docs"], seq_lens=[32], ppl_windows=2, rows=["best"]))
    assert set(again["rows"]["best"]["ppl"]) == {"stdlib-docs@32"} and "zeroshot" not in again["rows"]["best"]


def test_bench_cli_table_and_errors_keep_results(searched, tmp_path, text_file):
    runner = CliRunner()
    root = str(searched.path.parent)
    r = runner.invoke(app, ["bench", "b", "--sessions-dir", root])
    assert r.exit_code == 2 and "no benchmark yet" in r.output
    md = tmp_path / "t.md"
    r = runner.invoke(app, ["bench", "b", "--sessions-dir", root, "--ppl", str(text_file), "--seq-len", "32",
                            "--ppl-windows", "2", "--rows", "dense,best", "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    assert "benchmark" in r.output and md.read_text().startswith("| row | params |")
    before = (searched.path / "bench.json").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    for args, message in ((["--tasks", str(bad)], "bad.jsonl:1"), (["--tasks", "nope_task_xyz"], "unknown task"),
                          (["--ppl", str(tmp_path / "gone.txt")], "gone.txt"),
                          (["--ppl", "stdlib-docs", "--rows", "dense,nope"], "no row 'nope'")):
        r = runner.invoke(app, ["bench", "b", "--sessions-dir", root, *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert (searched.path / "bench.json").read_text() == before  # nothing computed was lost
    r = runner.invoke(app, ["bench", "b", "--sessions-dir", root])
    assert r.exit_code == 0 and "dense" in r.output


def test_objective_with_zero_shot_rows_that_benchmarks_leave_out(tmp_path, tokenizer):
    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tasks = _write(tmp_path / "val.jsonl", _choice_rows(10))
    cfg = SearchConfig(model=str(folder), trials=2, objective_windows=2, pool_size=12, device="cpu",
                       sources=["stdlib-docs"], objective=["stdlib-docs/valid"], objective_tasks=[tasks],
                       objective_task_rows=4, objective_task_weight=2.0)
    session = create_session(tmp_path / "s", "zs", cfg)
    events = []
    run_search(session, events.append)
    done = [e for e in events if e.kind == "trial_finished" and e.state == "complete"]
    assert done and all("zero-shot accuracy" in e.message for e in done)
    res = run_bench(session, BenchConfig(tasks=[tasks], rows=["dense"]))
    z = res["rows"]["dense"]["zeroshot"]["val"]
    assert z["n"] == 6 and z["objective_rows_left_out"] == 4
    with pytest.raises(AdapruneError, match="local task file"):
        create_session(tmp_path / "s", "named", SearchConfig(model=str(folder), objective_tasks=["piqa"]))


def test_a_standard_task_without_the_hub_fails_in_one_line(tokenizer):
    # piqa by name is lm-eval's own task; here the hub is unreachable (HF_HUB_OFFLINE), so it must say so
    spec = parse_task("piqa")
    assert spec.path is None
    with pytest.raises(AdapruneError, match="needs the Hugging Face hub.*local .jsonl"):
        zero_shot(make_model("llama"), tokenizer, [spec], limit=2)


def test_a_hub_task_with_the_hub_unreachable_is_refused_before_any_model_loads(monkeypatch):
    """Not after the model is loaded and the dense rows measured, with a minute of datasets' retries."""
    from engine.bench.run import validate

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # no cache promised: the hub is needed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdapruneError, match="'piqa' needs the Hugging Face hub, which is unreachable.*HF_DATASETS"):
        validate(BenchConfig(tasks=["piqa"]))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the user says its dataset is cached: the run tries it
    assert [t.name for t in validate(BenchConfig(tasks=["piqa"]))[0]] == ["piqa"]


def test_a_benchmark_logs_to_the_session_obeys_requests_and_runs_one_at_a_time(searched, text_file, monkeypatch):
    """What lets the app run it detached: its events in the session's log, a cancel from another process
    obeyed at the next safe point (what was measured kept), and one benchmark per session at a time."""
    from engine.errors import Cancelled
    from engine.events import Metric
    from engine.session import requests
    from engine.session.requests import request

    monkeypatch.setattr(requests, "POLL_S", 0.0)  # every safe point reads the requests file
    cfg = BenchConfig(ppl=[str(text_file)], seq_lens=[32], ppl_windows=2, rows=["dense", "best"])
    with searched.lock("bench"), pytest.raises(AdapruneError, match="its bench"):
        run_bench(searched, cfg)
    with searched.lock():  # a search may run beside it: its lock is another one
        seen = []

        def cancel_after_dense(event):
            seen.append(event)
            if isinstance(event, Metric) and event.model == "dense":
                request(searched, "bench", "cancel")

        with pytest.raises(Cancelled):
            run_bench(searched, cfg, cancel_after_dense)
    rows = searched.read_json("bench.json")["rows"]
    assert "ppl" in rows["dense"] and "ppl" not in rows.get("best", {})
    logged = [e for e in searched.read_events()[0] if e.get("kind") == "metric"]
    assert logged and logged[-1]["model"] == "dense"
    assert searched.holder("bench") is None


def test_later_edits_do_not_leak_into_the_rows_derived_from_best(searched):
    """baseline and magnitude are made as best was (its protected layers), not with overrides the session took
    on after it (those are the row plan:overrides)."""
    cfg = BenchConfig(ppl=["stdlib-docs"], seq_lens=[32], ppl_windows=1, rows=["baseline", "magnitude"])
    before = run_bench(searched, cfg)["rows"]
    (searched.path / "bench.json").unlink()
    config = searched.config()
    searched.update(config={**config, "overrides": {"1": "lock"}})  # what a re-evaluate on Layers saves
    after = run_bench(searched, cfg)["rows"]
    for row in ("baseline", "magnitude"):
        assert after[row]["plan"] == before[row]["plan"], row
        assert after[row]["params"] == before[row]["params"]


def test_rows_of_a_model_the_session_no_longer_has_are_marked_outdated(tmp_path, searched_template):
    from engine import api
    from engine.session.layout import best_record, plan_id, save_plan, write_best

    session = searched_template(tmp_path, "old")
    best = best_record(session)
    saved = {**best.plan, "note": "edited"}
    save_plan(session, "mine", saved)
    rows = {"dense": {"plan_id": "dense", "params": 10}, "best": {"plan_id": plan_id(best.plan), "params": 8},
            "plan:mine": {"plan_id": plan_id(saved), "params": 8},
            "recovered": {"plan_id": plan_id(best.plan) + "+lora-abc", "params": 8, "recovery_loss": "LM"}}
    session.write_json("bench.json", {"rows": rows, "dense_params": 10})
    marked = {n: r.get("outdated") for n, r in api.bench_results(session)["rows"].items()}
    assert marked == {"dense": None, "best": None, "plan:mine": None,
                      "recovered": "its LoRA recovery was discarded"}
    write_best(session, replace(best, plan={**best.plan, "note": "a new best"}))
    save_plan(session, "mine", {**saved, "note": "again"})
    results = api.bench_results(session)
    assert results["rows"]["best"]["outdated"] == "a new best trial since"
    assert results["rows"]["plan:mine"]["outdated"] == "plan:mine was saved again since"
    header, body = api.table(results)
    assert [line[0] for line in body] == ["dense", "best (outdated)", "recovered (LM) (outdated)",
                                          "plan:mine (outdated)"]
    assert "recovered is outdated: its LoRA recovery was discarded" in api.to_markdown(results)
    assert "outdated" not in json.loads((session.path / "bench.json").read_text())["rows"]["best"]  # only shown


def test_cells_measured_on_other_windows_than_dense_are_marked_not_comparable():
    """A second run with other windows and only some rows leaves a column of numbers from two settings."""
    from engine.bench.table import mismatched, provenance, table

    def ppl(value, windows, sha="aa"):
        return {"ppl": {"t@128": {"value": value, "windows": windows, "tokens": windows * 128, "sha256": sha,
                                  "seq_len": 128, "text": "t"}}, "params": 10}

    results = {"rows": {"dense": ppl(337.11, 3), "best": ppl(377.13, 40), "baseline": ppl(390.0, 3)}}
    assert mismatched(results) == {("best", "t@128"): "40 windows (dense: 3 windows)"}
    header, body = table(results)
    cells = {line[0]: line[header.index("PPL t@128")] for line in body}
    assert cells == {"dense": "337.11", "best": "377.13 *", "baseline": "390.00"}
    assert any(line.startswith("* PPL t@128 of best was measured on 40 windows") for line in provenance(results))
    results["rows"]["best"] = ppl(377.13, 3, sha="bb")
    assert "of another text" in mismatched(results)["best", "t@128"]
    results["rows"]["best"] = ppl(377.13, 3)
    assert mismatched(results) == {}
