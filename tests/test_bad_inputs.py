"""The bad-input catalogue (RELIABILITY.md): each row's input, through the CLI, is one line naming the problem and
what to do, exit 2, no traceback, and nothing written. Rows covered elsewhere name their test in the catalogue."""

from __future__ import annotations

import json
import os
import socket

import pytest
from typer.testing import CliRunner

from tui.cli import app

runner = CliRunner()


@pytest.fixture
def tiny(tmp_path, tokenizer):
    from conftest import make_model

    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def refused(args, match: str, watch=None) -> None:
    """One line on stderr naming the problem, exit 2, no traceback; `watch` (a folder) unchanged."""
    before = sorted(str(p) for p in watch.rglob("*")) if watch is not None and watch.exists() else None
    r = runner.invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert match in lines[0], lines[0]
    assert "Traceback" not in r.output
    if watch is not None:
        assert (sorted(str(p) for p in watch.rglob("*")) if watch.exists() else None) == before


def test_broken_model_folders(tiny, tmp_path):
    import shutil

    bad_json = tmp_path / "bad-json"
    shutil.copytree(tiny, bad_json)
    (bad_json / "config.json").write_text("{ not json")
    refused(["prune", "--model", bad_json], "config.json", tmp_path)
    cut = tmp_path / "cut"
    shutil.copytree(tiny, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    refused(["prune", "--model", cut, "--no-speed"], "cannot load model", tmp_path)


def test_bad_layer_ranges_and_targets(tiny, tmp_path):
    for layers, match in (("a-b", "--layers"), ("3-1", "--layers"), ("-1-2", "--layers")):
        refused(["prune", "--model", tiny, "--layers", layers], match, tmp_path)


def test_bad_session_names_urls_and_states(tiny, tmp_path, searched_template):
    root = tmp_path / "sessions"
    refused(["search", "--session", "bad name", "--model", tiny, "--sessions-dir", root], "letters", tmp_path)
    refused(["search", "--session", "s", "--model", tiny, "--storage", "bogus://x", "--sessions-dir", root],
            "study storage 'bogus://x'", tmp_path)
    refused(["resume", "nope", "--sessions-dir", root], "no session 'nope'", tmp_path)
    session = searched_template(root, "done")
    refused(["search", "--session", "done", "--model", tiny, "--sessions-dir", root], "adaprune resume done",
            root)
    for command in (["recover", "nope"], ["export", "nope", "--out", tmp_path / "o"], ["bench", "nope"]):
        refused([*command, "--sessions-dir", root], "no session 'nope'", tmp_path)
    refused(["export", "done", "--out", tmp_path / "o", "--plan", "plan:nope", "--sessions-dir", root],
            "plan:nope", tmp_path)
    refused(["export", "done", "--out", tmp_path / "o", "--widths", "wide", "--sessions-dir", root], "--widths",
            tmp_path)
    refused(["bench", "done", "--ppl", "stdlib-docs", "--seq-len", "0", "--sessions-dir", root], "--seq-len", root)
    # driven by a live process: a second driver is refused, the session untouched
    (session.path / "lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    refused(["resume", "done", "--sessions-dir", root], f"pid {os.getpid()}", root)
    (session.path / "lock").unlink()
    manifest = session.manifest_path.read_text()
    session.manifest_path.write_text("{ cut")
    refused(["resume", "done", "--sessions-dir", root], "corrupt", root)
    session.manifest_path.write_text(json.dumps({**json.loads(manifest), "schema_version": 99}))
    refused(["export", "done", "--out", tmp_path / "o", "--sessions-dir", root], "newer adaprune", root)


@pytest.mark.parametrize("text, match", [("\xff\xfe\x00b\x00a\x00d", "UTF-8"), ("short", "fewer than one 128-token window")])
def test_texts_that_cannot_feed_the_windows(tiny, tmp_path, text, match):
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode("latin-1"))
    refused(["prune", "--model", tiny, "--calib", f"{f}:64x128", "--no-speed"], match, tmp_path)
