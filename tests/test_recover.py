"""LoRA recovery: it learns, it resumes exactly, it merges into plain weights that export and benchmark."""

import copy

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from engine.config import RecoverConfig, SearchConfig
from engine.errors import AdapruneError, Cancelled
from engine.events import RecoveryStep
from engine.model.load import load
from engine.model.structure import count_params
from engine.prune.plan import Plan
from engine.recover.train import lr_at, recovered_model, run_recovery
from engine.session.layout import ADAPTER, checkpoint_dir, recovery_dir, recovery_state
from engine.session.store import Session
from engine.session.summary import summary
from tui.cli import app


@pytest.fixture
def searched(tmp_path, searched_template):
    return searched_template(tmp_path / "s", "r")


def _cfg(text_file, **kw) -> RecoverConfig:
    base = dict(data=[str(text_file)], valid=[str(text_file)], steps=12, batch_size=2, seq_len=32, lr=3e-3,
                warmup=2, valid_windows=4, valid_len=32, eval_every=4, save_every=3, dropout=0.1)
    return RecoverConfig(**{**base, **kw})


def _pruned(session: Session):
    from engine.control import Control
    from engine.prune.reconstruct import apply_stored_plan
    from engine.search.data import SearchData

    cfg = SearchConfig.from_dict(session.config())
    loaded = load(cfg.model, device="cpu")
    windows_for = SearchData(session, cfg, loaded, lambda e: None, Control()).repair_windows
    model = loaded.model
    apply_stored_plan(model, Plan.from_dict(session.read_json("plan.json")["plan"]), windows_for)
    return loaded, model


def test_recovery_learns_and_merges_into_plain_weights(searched, text_file):
    root = searched.path.parent
    steps = []
    state = run_recovery(root, "r", _cfg(text_file), steps.append)
    assert state.status == "done" and state.step == 12 and len(state.history) == 12
    assert [e.step for e in steps if isinstance(e, RecoveryStep)] == list(range(1, 13))
    losses = [h["loss"] for h in state.history]
    assert sum(losses[-4:]) < sum(losses[:4])  # it learns the training text
    assert state.valid_ppl_after < state.valid_ppl_before
    assert state.trainable_params > 0 and state.data and state.valid

    dense = load(SearchConfig.from_dict(searched.config()).model, device="cpu").model
    _, pruned = _pruned(searched)
    merged, _ = recovered_model(searched, copy.deepcopy(dense))
    assert not any("lora" in k for k in merged.state_dict())
    assert count_params(merged) == count_params(pruned) == Plan.from_dict(searched.read_json("plan.json")["plan"]).params_after
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=x).logits, pruned(input_ids=x).logits)

    # a session from the first layout (one checkpoint in recovery/ itself, no name in the state) still merges
    state_now = recovery_state(searched)
    for f in checkpoint_dir(searched, state_now).iterdir():
        f.rename(recovery_dir(searched) / f.name)
    searched.write_json("recovery/state.json", {k: v for k, v in state_now.to_dict().items() if k != "checkpoint"})
    old_layout, _ = recovered_model(searched, copy.deepcopy(dense))
    with torch.no_grad():
        torch.testing.assert_close(old_layout(input_ids=x).logits, merged(input_ids=x).logits)

    # a damaged state refuses a resume with its reason, and does not stand in the way of --restart
    searched.write_json("recovery/state.json", {**state_now.to_dict(), "foo": 1})
    with pytest.raises(AdapruneError, match="unknown key.*foo"):
        run_recovery(root, "r", RecoverConfig(), resume=True)
    # activation checkpointing trades compute for memory, not results
    again = run_recovery(root, "r", _cfg(text_file, steps=3, grad_checkpointing=True), restart=True)
    for a, b in zip(again.history, state.history[:3], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(b["loss"])


def test_interrupted_recovery_resumes_to_the_same_weights(searched, text_file, tmp_path):
    root = searched.path.parent
    own = tmp_path / "own.txt"  # this test edits its text
    own.write_text(text_file.read_text())
    text_file = own
    run_recovery(root, "r", _cfg(text_file))
    straight = load_file(str(checkpoint_dir(searched, recovery_state(searched)) / ADAPTER))

    from engine.control import Control

    control = Control()

    def stop_after_five(event):
        if isinstance(event, RecoveryStep) and event.step == 5:
            control.cancel()

    with pytest.raises(Cancelled):
        run_recovery(root, "r", _cfg(text_file), stop_after_five, control, restart=True)
    assert searched.read_json("recovery/state.json")["step"] == 5  # saved at the stop, not only at save_every
    assert summary(searched).recovery == "stopped 5/12"
    with pytest.raises(AdapruneError, match="stopped at step 5"):
        recovered_model(searched, make_model("llama"))
    original = text_file.read_text()
    text_file.write_text(original + " more")
    with pytest.raises(AdapruneError, match="text changed"):
        run_recovery(root, "r", RecoverConfig(), resume=True)
    text_file.write_text(original)
    state = run_recovery(root, "r", RecoverConfig(steps=999), resume=True)  # the saved configuration wins
    assert state.step == 12 and state.status == "done"
    resumed = load_file(str(checkpoint_dir(searched, recovery_state(searched)) / ADAPTER))
    # one checkpoint is kept, the one state.json names; nothing half-written is left
    kept = sorted(p.name for p in recovery_dir(searched).iterdir())
    assert kept == sorted(["state.json", recovery_state(searched).checkpoint])
    assert set(resumed) == set(straight)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-7)


def test_export_of_the_recovered_model_loads_and_matches(searched, text_file, tmp_path):
    from engine.session_export import export_session

    root = searched.path.parent
    run_recovery(root, "r", _cfg(text_file, steps=4))
    out = tmp_path / "exported"
    fmt = export_session(root, "r", out, recovered=True)
    merged, _ = recovered_model(searched, load(SearchConfig.from_dict(searched.config()).model, device="cpu").model)
    again = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=fmt != "uniform").eval()
    x = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, merged(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    assert "LoRA-recovered" in (out / "README.md").read_text()
    with pytest.raises(AdapruneError, match="leave --widths at plan"):
        export_session(root, "r", tmp_path / "u", widths="uniform", recovered=True)


def test_bench_has_a_recovered_row(searched, text_file):
    from engine.bench.run import run_bench
    from engine.config import BenchConfig

    root = searched.path.parent
    run_recovery(root, "r", _cfg(text_file, steps=3))
    results = run_bench(searched, BenchConfig(ppl=[str(text_file)], ppl_windows=2, rows=["best", "recovered"]))
    best, rec = results["rows"]["best"], results["rows"]["recovered"]
    assert rec["params"] == best["params"] and rec["plan_id"].startswith(best["plan_id"] + "+lora-")
    assert rec["ppl"] != best["ppl"]


def test_bad_recovery_input_is_one_line_and_keeps_state(searched, text_file, tmp_path):
    root = searched.path.parent
    cases = [
        (dict(steps=0), "--steps 0"),
        (dict(steps=2, warmup=10), "--warmup 10: give 0 to 2 steps, at most --steps"),
        (dict(lr=-1.0), "--lr -1"),
        (dict(targets=["q_proj", "lm_head"]), "--targets"),
        (dict(data=["self"]), "self:NxL"),
        (dict(valid=["self:4x32"]), "not text sampled"),
        (dict(plan="plan:nope"), "no plan 'plan:nope'"),
        (dict(data=[str(tmp_path / "missing.txt")]), "neither a file"),
    ]
    for kw, message in cases:
        with pytest.raises(AdapruneError, match=message):
            run_recovery(root, "r", _cfg(text_file, **kw))
        assert not (recovery_dir(searched) / "state.json").exists()
    with pytest.raises(AdapruneError, match="no recovery to resume"):
        run_recovery(root, "r", _cfg(text_file), resume=True)
    with searched.lock("recovery"), pytest.raises(AdapruneError, match=r"\(its recovery\): wait for it or stop it$"):
        run_recovery(root, "r", _cfg(text_file))
    with searched.lock(), pytest.raises(AdapruneError, match="its search.*adaprune worker r"):
        run_recovery(root, "r", _cfg(text_file))
    run_recovery(root, "r", _cfg(text_file, steps=2))
    with pytest.raises(AdapruneError, match="already has a recovery"):
        run_recovery(root, "r", _cfg(text_file))
    with pytest.raises(AdapruneError, match="already finished"):
        run_recovery(root, "r", _cfg(text_file), resume=True)

    runner = CliRunner()
    r = runner.invoke(app, ["recover", "r", "--sessions-dir", str(root), "--steps", "0"])
    assert r.exit_code == 2 and "--steps 0" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["recover", "r", "--sessions-dir", str(root), "--restart", "--steps", "2", "--batch", "2",
                            "--seq-len", "32", "--data", str(text_file), "--valid", str(text_file),
                            "--valid-windows", "2"])
    assert r.exit_code == 0, r.output
    assert "recovered: validation PPL" in r.output
    r = runner.invoke(app, ["sessions", "--sessions-dir", str(root)])
    assert r.exit_code == 0 and "LoRA done" in r.output and summary(searched).recovery == "done"


def test_learning_rate_schedule():
    cfg = RecoverConfig(steps=10, warmup=2, lr=1.0)
    assert [round(lr_at(cfg, s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    # unset: a tenth of the steps, at most 10, so a short run still reaches its rate
    assert [round(lr_at(RecoverConfig(steps=4, lr=1.0), s), 3) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_at(RecoverConfig(steps=500, lr=1.0), 8) == pytest.approx(0.9)


def test_distil_loss_is_the_kl_divergence():
    from engine.recover.train import distil_loss

    g = torch.Generator().manual_seed(0)
    t, st = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    assert float(distil_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    p, q = t[:, :-1].softmax(-1), st[:, :-1].softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(distil_loss(st, t)) == pytest.approx(float(want), rel=1e-5)


def test_distillation_moves_the_pruned_model_toward_the_dense_one(searched, text_file):
    from engine.data.text import load_text
    from engine.data.windows import random_windows, tokenize
    from engine.recover.train import distil_loss, loss_name

    root = searched.path.parent
    state = run_recovery(root, "r", _cfg(text_file, distil=1.0, steps=8, eval_every=4))
    assert state.status == "done" and state.config.distil == 1.0
    assert loss_name(state.config) == "KL to dense"
    loaded, pruned = _pruned(searched)
    dense = load(SearchConfig.from_dict(searched.config()).model, device="cpu").model
    merged, _ = recovered_model(searched, copy.deepcopy(dense), _pruned_windows(searched, loaded))
    x = random_windows(tokenize(loaded.tokenizer, load_text(str(text_file), "calib")), 4, 32, seed=1)
    with torch.no_grad():
        target = dense(input_ids=x).logits
        before = float(distil_loss(pruned(input_ids=x).logits, target))
        after = float(distil_loss(merged(input_ids=x).logits, target))
    assert after < before
    r = CliRunner().invoke(app, ["recover", "r", "--sessions-dir", str(root), "--restart", "--distil",
                                 "--distil-weight", "2"])
    assert r.exit_code == 2 and "--distil-weight 2" in r.output and "Traceback" not in r.output


def _pruned_windows(session, loaded):
    from engine.control import Control
    from engine.search.data import SearchData

    return SearchData(session, SearchConfig.from_dict(session.config()), loaded, lambda e: None, Control()).repair_windows


def test_recovery_on_text_sampled_from_the_dense_model_resumes_on_the_same_samples(searched, text_file):
    """`--data self:NxL`: the dense model samples once (kept in recovery/), and a resumed run trains on the
    very same sequences, to the same weights as an uninterrupted one."""
    root = searched.path.parent
    cfg = _cfg(text_file, data=["self:6x32", str(text_file)], steps=4, save_every=2, distil=1.0)

    from engine.control import Control

    control = Control()

    def stop_after_two(event):
        if isinstance(event, RecoveryStep) and event.step == 2:
            control.cancel()

    with pytest.raises(Cancelled):
        run_recovery(root, "r", cfg, stop_after_two, control)
    samples = list(recovery_dir(searched).glob("text-self-*.safetensors"))
    assert len(samples) == 1 and load_file(str(samples[0]))["ids"].shape == (6, 32)
    first = load_file(str(samples[0]))["ids"]
    resumed = run_recovery(root, "r", cfg, resume=True)
    assert resumed.status == "done" and resumed.data["self:6x32"] == "self"
    assert torch.equal(load_file(str(samples[0]))["ids"], first)  # not drawn again
    whole = run_recovery(root, "r", cfg, restart=True)
    assert [h["loss"] for h in whole.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-5)
