"""Text sources: specs, the built-in corpus and its split, files, hub loading (with a local stand-in)."""

import json

import pytest
import torch

from engine.data import text, windows
from engine.data.text import load_text, parse_spec
from engine.data.windows import eval_windows, random_windows
from engine.errors import AdapruneError


def test_parse_spec():
    assert parse_spec("stdlib-docs:10x64") == text.TextSpec("stdlib-docs", None, 10, 64)
    assert parse_spec("wikitext2/validation") == text.TextSpec("wikitext2", "validation")
    assert parse_spec("data/my file.txt:4x128") == text.TextSpec("data/my file.txt", None, 4, 128)
    with pytest.raises(AdapruneError):
        parse_spec("stdlib-docs:0x64")


def test_stdlib_docs_splits_are_disjoint_and_stable():
    calib, valid, test = (text.stdlib_docs(s) for s in ("calib", "valid", "test"))
    assert len(calib) > 500_000 and len(valid) > 50_000 and len(test) > 100_000
    calib_docs, test_docs = set(calib.split("\n\n")), set(test.split("\n\n"))
    shared = {d for d in calib_docs & test_docs if len(d) > 200}
    assert not shared
    assert text.stdlib_docs("test") == test  # read back from the cache: identical
    assert load_text("stdlib-docs", "eval") == test and load_text("stdlib-docs", "calib") == calib


def test_files(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "first"}\n\n{"text": "second"}\n')
    assert load_text(str(p), "calib") == "first\n\nsecond"
    p.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(AdapruneError, match=r"a.jsonl:2: not valid JSON"):
        load_text(str(p), "calib")
    p.write_text('{"body": "no text field"}\n')
    with pytest.raises(AdapruneError, match=r":1: expected an object"):
        load_text(str(p), "calib")
    # instruction data in Alpaca's fields reads as the hub's alpaca does
    p.write_text(json.dumps({"instruction": "Add", "input": "2 and 2", "output": "4"}) + "\n"
                 + json.dumps({"instruction": "Greet", "input": "", "output": "Hello"}) + "\n")
    assert load_text(str(p), "calib") == "Add\n\n2 and 2\n\n4\n\nGreet\n\nHello"
    b = tmp_path / "b.txt"
    b.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(AdapruneError, match="looks binary"):
        load_text(str(b), "calib")
    e = tmp_path / "e.txt"
    e.write_text("  \n\n ")
    with pytest.raises(AdapruneError, match="is empty"):
        load_text(str(e), "calib")
    with pytest.raises(AdapruneError, match="neither a file nor a known name"):
        load_text(str(tmp_path / "missing.txt"), "calib")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"], "n": [1, 2]}), p)
    assert load_text(str(p), "eval") == "alpha\n\nbeta"
    with pytest.raises(AdapruneError, match="no column 'body'"):
        load_text(str(p), "eval", field="body")


def test_hub_datasets_load_through_datasets(monkeypatch, tmp_path):
    """The hub is unreachable here: stand a local dataset in for load_dataset and check what is asked for."""
    import datasets

    calls = []

    def fake_load(path, name=None, **kw):
        calls.append((path, name, kw))
        rows = {"text": ["= Title =", "Body text ."]} if path != "yahma/alpaca-cleaned" else {
            "instruction": ["Say hi"], "input": [""], "output": ["hi"]}
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_text("wikitext2", "eval") == "= Title =\n\nBody text ."
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", {"split": "test"})
    load_text("wikitext2", "calib")
    assert calls[-1][2] == {"split": "train"}
    load_text("c4", "eval")
    assert calls[-1][0] == "allenai/c4" and "c4-validation" in calls[-1][2]["data_files"]["validation"]
    assert load_text("alpaca", "calib") == "Say hi\n\nhi"


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(AdapruneError, match="hub may be unreachable"):
        load_text("ptb", "eval")


def test_windows():
    ids = torch.arange(1000)
    w = random_windows(ids, 5, 64, seed=3)
    assert w.shape == (5, 64) and torch.equal(w, random_windows(ids, 5, 64, seed=3))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 64)) for row in w)
    e = eval_windows(ids, 100)
    assert e.shape == (10, 100) and torch.equal(e.flatten(), ids)
    assert eval_windows(ids, 100, 3)[:, 0].tolist() == [0, 400, 900]
    with pytest.raises(AdapruneError, match="fewer than one"):
        random_windows(torch.arange(10), 2, 64, 0)


def test_self_text_is_sampled_from_the_model(tokenizer, monkeypatch):
    import transformers.generation.utils as gen
    from conftest import make_model

    warned = []
    monkeypatch.setattr(gen.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    model = make_model("llama")
    model.config.pad_token_id = tokenizer.bos_token_id  # the prompt is all BOS: it must not read as padding
    a = windows.sample_self(model, tokenizer, 3, 10, seed=5)
    b = windows.sample_self(model, tokenizer, 3, 10, seed=5)
    assert a.shape == (3, 10) and torch.equal(a, b)
    assert not [m for m in warned if "padding" in str(m)]


def test_self_text_reports_every_token_and_obeys_a_cancel_between_tokens(tokenizer):
    from conftest import make_model

    from engine.control import Control
    from engine.errors import Cancelled

    model = make_model("llama")
    done: list[int] = []
    windows.sample_self(model, tokenizer, 5, 8, seed=1, batch_size=4, on_batch=done.append)
    assert done == sorted(done) and done[-1] == 5 and len(done) > 2  # moves within a batch, ends at n
    control, heard = Control(), []

    def cancel_at_first_token(n: int) -> None:
        heard.append(n)
        control.cancel()

    with pytest.raises(Cancelled):
        windows.sample_self(model, tokenizer, 4, 50, seed=1, on_batch=cancel_at_first_token, control=control)
    assert len(heard) == 1  # the next token's checkpoint stopped it, not the end of the batch


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"content": "x y z"}) + "\n")
    assert load_text(str(p), "calib", field="content") == "x y z"


def test_a_mixed_calibration_spec_draws_each_source_and_joins_them(tokenizer, text_file):
    from engine.data.text import calib_parts, check_calib
    from engine.data.windows import draw_windows

    mixed = f"stdlib-docs:3x16+{text_file}:2x16"
    assert calib_parts(mixed) == ["stdlib-docs:3x16", f"{text_file}:2x16"]
    assert calib_parts("my+data.txt:4x16") == ["my+data.txt:4x16"]  # a file name may hold a '+'
    assert [ts.n for ts in check_calib(mixed)] == [3, 2]
    got, digest = draw_windows(None, tokenizer, mixed, 0)
    first, h1 = draw_windows(None, tokenizer, "stdlib-docs:3x16", 0)
    second, h2 = draw_windows(None, tokenizer, f"{text_file}:2x16", 0)
    assert torch.equal(got, torch.cat([first, second])) and digest == f"{h1}+{h2}"
    with pytest.raises(AdapruneError, match="one window length"):
        check_calib(f"stdlib-docs:3x16+{text_file}:2x32")
    with pytest.raises(AdapruneError, match="needs a size"):
        check_calib("stdlib-docs")
