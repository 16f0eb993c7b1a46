"""The headless CLI: a full prune run, and one-line errors with nothing half-written for bad input."""

import json

import pytest
from typer.testing import CliRunner

from tui.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, match):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_prune_end_to_end(tiny_folder, tmp_path):
    out, js = tmp_path / "out", tmp_path / "r.json"
    r = _run("prune", "--model", tiny_folder, "--prune", "0.2", "--calib", "stdlib-docs:4x32", "--eval-windows", "3",
             "--out", out, "--json", js, "--layers", "all")
    assert r.exit_code == 0, r.output
    assert "parameters" in r.output and "PPL stdlib-docs" in r.output and "peak memory" in r.output
    result = json.loads(js.read_text())
    removed = result["dense"]["params"] - result["pruned"]["params"]
    assert abs(removed / result["dense"]["params"] - 0.2) < 0.01
    assert result["export_format"] == "uniform"
    assert result["pruned"]["peak_mib"] > 0 and result["dense"]["speed"]["prefill_tok_s"] > 0
    plan = json.loads((out / "adaprune_plan.json").read_text())
    assert plan["params_after"] == result["pruned"]["params"]


def test_attn_share_zero_takes_everything_from_mlp(tiny_folder, tmp_path):
    js = tmp_path / "r.json"
    r = _run("prune", "--model", tiny_folder, "--calib", "stdlib-docs:2x32", "--eval-windows", "1", "--no-speed",
             "--attn-share", "0", "--metric", "l2", "--json", js)
    assert r.exit_code == 0, r.output
    plan = json.loads(js.read_text())["plan"]
    assert all(len(lp["keep_heads"]) == 6 for lp in plan["layers"])
    assert any(len(lp["keep_channels"]) < 64 for lp in plan["layers"])


def test_global_allocation_from_the_command_line(tiny_folder, tmp_path):
    js = tmp_path / "r.json"
    r = _run("prune", "--model", tiny_folder, "--calib", "stdlib-docs:2x32", "--eval-windows", "1", "--no-speed",
             "--allocation", "global", "--json", js)
    assert r.exit_code == 0, r.output
    plan = json.loads(js.read_text())["plan"]
    assert plan["recipe"]["allocation"] == "global" and plan["params_after"] < plan["params_before"]
    _one_line_error(_run("prune", "--model", tiny_folder, "--allocation", "spread"), "--allocation")
    _one_line_error(_run("prune", "--model", tiny_folder, "--allocation", "global", "--ramp", "0.2"), "--ramp")


@pytest.fixture
def gpt2_folder(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=320)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bad_models(tmp_path, gpt2_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(_run("prune", "--model", tmp_path / "nope"), "does not exist")
    _one_line_error(_run("prune", "--model", gpt2_folder), "prunes LLaMA-family")
    _one_line_error(_run("prune", "--model", "someone/not-cached-model"), "hub is unreachable")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_run("prune", "--model", empty), "without config.json")


def test_bad_numbers(tiny_folder):
    for bad in ("0", "0.95", "-0.2"):
        _one_line_error(_run("prune", "--model", tiny_folder, "--prune", bad), "outside (0, 0.9]")
    _one_line_error(_run("prune", "--model", tiny_folder, "--prune", "0.9", "--layers", "1-1", "--no-speed"),
                    "at most")
    _one_line_error(_run("prune", "--model", tiny_folder, "--metric", "nope"), "unknown metric")
    _one_line_error(_run("prune", "--model", tiny_folder, "--layers", "2-99"), "outside the model's layers")
    _one_line_error(_run("prune", "--model", tiny_folder, "--calib", "stdlib-docs"), "needs a size")


def test_bad_calibration_files(tiny_folder, tmp_path):
    empty, binary, bad = tmp_path / "e.txt", tmp_path / "b.txt", tmp_path / "m.jsonl"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 10)
    bad.write_text('{"text": "fine"}\n{oops\n')
    out = tmp_path / "out"
    for f, msg in ((empty, "is empty"), (binary, "looks binary"), (bad, "m.jsonl:2")):
        r = _run("prune", "--model", tiny_folder, "--calib", f"{f}:2x16", "--no-speed", "--eval-windows", "1",
                 "--out", out)
        _one_line_error(r, msg)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "e.txt", "m.jsonl", tiny_folder.name]


def test_bad_inputs_are_refused_before_the_model_loads(tiny_folder, tmp_path, monkeypatch):
    """Every input checkable without the model fails first, in one line: a typo costs seconds, not a load."""
    import engine.oneshot
    import engine.search.driver

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(engine.oneshot, "load_configured", loaded)
    monkeypatch.setattr(engine.search.driver, "num_layers", loaded)
    empty, binary, bad = tmp_path / "e.txt", tmp_path / "b.txt", tmp_path / "m.jsonl"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 10)
    bad.write_text('{"text": "fine"}\n{oops\n')
    for args, msg in (
        (["--calib", f"{tmp_path}/missing.txt:2x16"], "neither a file nor a known name"),
        (["--calib", "nosuchsource:2x16"], "neither a file nor a known name"),
        (["--calib", f"{empty}:2x16"], "is empty"), (["--calib", f"{binary}:2x16"], "looks binary"),
        (["--calib", f"{bad}:2x16"], "m.jsonl:2"), (["--calib", "stdlib-docs/nosplit:2x16"], "has splits"),
        (["--eval", "nosuchsource"], "neither a file nor a known name"),
        (["--calib", ":ten:[bold]x:4x8"], "':ten:[bold]x'"),  # user text printed as typed: no emoji, no markup
        (["--reconstruct", "--reconstruct-calib", f"{empty}:4x16"], "is empty"),
    ):
        _one_line_error(_run("prune", "--model", tiny_folder, *args), msg)
    for model in ("../nope/model", "./models/missing", "nope", "x/y.safetensors"):
        _one_line_error(_run("prune", "--model", model), "does not exist")
    root = tmp_path / "sessions"
    for args, msg in ((["--source", "nosuchsource"], "neither a file nor a known name"),
                      (["--objective", f"{empty}"], "is empty"),
                      (["--model", "../nope/model"], "does not exist")):
        _one_line_error(_run("search", "--session", "s", "--model", tiny_folder, "--sessions-dir", root, *args), msg)
    assert not root.exists() or not any(root.iterdir())


def test_existing_output_refused_before_work(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("x")
    _one_line_error(_run("prune", "--model", tiny_folder, "--out", out), "pass --force")
    assert (out / "precious").read_text() == "x"


def test_no_subcommand_shows_help():
    r = _run()
    assert r.exit_code == 0 and "prune" in r.output


def test_overrides_from_the_command_line(tiny_folder, tmp_path):
    js = tmp_path / "r.json"
    r = _run("prune", "--model", tiny_folder, "--calib", "stdlib-docs:2x32", "--eval-windows", "1", "--no-speed",
             "--layers", "all", "--override", "1=lock", "--override", "2=1/10", "--json", js)
    assert r.exit_code == 0, r.output
    layers = json.loads(js.read_text())["plan"]["layers"]
    assert len(layers[1]["keep_channels"]) == 64 and len(layers[2]["keep_channels"]) == 54
    _one_line_error(_run("prune", "--model", tiny_folder, "--override", "2=half"), "use L=lock or L=K/C")


def test_prune_with_reconstruction_end_to_end(tiny_folder, tmp_path):
    """The repaired model is what is measured and saved: lower PPL than slicing alone on the repair's own
    text, biases counted, and the export reloads with the same parameter count."""
    from engine.model.load import load

    runs = {}
    for name, extra in (("sliced", []), ("repaired", ["--reconstruct", "--reconstruct-calib", "stdlib-docs:16x32",
                                                       "--reconstruct-lambda", "0.3"])):
        js, out = tmp_path / f"{name}.json", tmp_path / name
        r = _run("prune", "--model", tiny_folder, "--calib", "stdlib-docs:4x32", "--eval", "stdlib-docs/calib",
                 "--eval-windows", "6", "--seq-len", "32", "--no-speed", "--no-memory", "--json", js, "--out", out,
                 *extra)
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(js.read_text())
    rep = runs["repaired"]
    assert rep["plan"]["repair"] == {"calib": "stdlib-docs:16x32", "lam": 0.3, "mode": "sequential", "seed": 0,
                                     "take": None}
    ppl = {k: next(iter(v["pruned"]["ppl"].values())) for k, v in runs.items()}
    assert ppl["repaired"] < ppl["sliced"]
    assert rep["pruned"]["params"] == rep["plan"]["params_after"]
    reloaded = load(str(tmp_path / "repaired"), device="cpu").model
    assert sum(p.numel() for p in reloaded.parameters()) == rep["plan"]["params_after"]


def test_bad_reconstruction_options_fail_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model"  # never loaded: the options are refused first
    _one_line_error(_run("prune", "--model", missing, "--reconstruct", "--reconstruct-lambda", "0"), "lambda")
    _one_line_error(_run("prune", "--model", missing, "--reconstruct", "--reconstruct-calib", "self"), ":NxL")


def test_the_apps_recovery_process_gets_exactly_the_forms_config(monkeypatch, tmp_path):
    """The app starts `adaprune recover` in its own process: the arguments must parse back to the same config."""
    from engine import api
    from engine.config import RecoverConfig
    from tui.backend import recovery_args

    seen = {}

    def fake(root, name, cfg, sink, resume=False, restart=False, since=None, control=None):
        seen.update(name=name, cfg=cfg, resume=resume, restart=restart)
        return api.RecoveryState(cfg, cfg.steps, "done", valid_ppl_before=2.0, valid_ppl_after=1.5)

    monkeypatch.setattr(api, "run_recovery", fake)
    for cfg, resume, restart in ((RecoverConfig(), False, False),
                                 (RecoverConfig(plan="plan:overrides", data=["a.txt", "stdlib-docs"], steps=7,
                                                lr=3e-5, rank=4, alpha=8, batch_size=2, seq_len=64,
                                                grad_checkpointing=True, distil=0.5), False, True)):
        r = _run(*recovery_args("s", cfg, resume, restart), "--sessions-dir", tmp_path)
        assert r.exit_code == 0, r.output
        assert seen == {"name": "s", "cfg": cfg, "resume": resume, "restart": restart}


def test_the_apps_bench_process_gets_exactly_the_forms_config(monkeypatch, tmp_path):
    """The app starts `adaprune bench` in its own process: the arguments must parse back to the same config."""
    from engine import api
    from engine.config import BenchConfig
    from tui.backend import bench_args

    task = tmp_path / "t.jsonl"
    task.write_text('{"query": "2+2=", "choices": ["4", "5"], "gold": 0}\n', encoding="utf-8")
    text = tmp_path / "t.txt"
    text.write_text("some held-out text " * 50, encoding="utf-8")
    seen = {}

    def fake(session, cfg, sink, control=None, since=None):
        seen.update(name=session, cfg=cfg)
        return {"rows": {}}

    monkeypatch.setattr(api.Session, "open", staticmethod(lambda root, name: name))
    monkeypatch.setattr(api, "run_bench", fake)
    for cfg in (BenchConfig(ppl=["stdlib-docs"]),
                BenchConfig(tasks=[str(task)], limit=20, seed=3, ppl=["stdlib-docs", str(text)], seq_lens=[128, 2048],
                            ppl_windows=None, speed=True, batches=[1, 8], rows=["dense", "best", "plan:overrides"])):
        r = _run(*bench_args("s", cfg), "--sessions-dir", tmp_path)
        assert r.exit_code == 0, r.output
        assert seen == {"name": "s", "cfg": cfg}


def test_the_sessions_table_at_80_columns_cuts_only_the_model_path():
    """A long model path keeps its end (the model's name); nothing else is squeezed to an ellipsis."""
    from rich.console import Console

    from engine.api import SessionRow
    from tui.report import sessions_table

    rows = [SessionRow("llama8b-30pct", "/home/someone/models/Meta-Llama-3.1-8B-Instruct", 0.3, 200, "cancelled",
                       1_790_000_000.0, 137, 12.3456, "stopped 40/100")]
    console = Console(width=80, record=True, color_system=None)
    console.print(sessions_table(rows))
    text = console.export_text()
    words = text.split()
    assert text.count("…") == 1 and "…3.1-8B-Instruct" in words, text  # only the path's head is cut
    assert {"llama8b-30pct", "137/200", "12.346", "40/100"} <= set(words) and "cancelled" in text, text
    assert all(len(line) <= 80 for line in text.splitlines())
