"""Tiny random GQA models and a tokenizer built here, so tests run offline on 2 cores in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CORPUS = [
    "Structured pruning removes whole attention heads and MLP channels from a language model. ",
    "The quick brown fox jumps over the lazy dog while the calibration data flows through the layers. ",
    "Bayesian optimisation chooses calibration samples and importance metrics for every trial. ",
    "Perplexity is measured on held out text in windows of one hundred and twenty eight tokens. ",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def make_model(kind: str = "llama", layers: int = 4, heads: int = 6, kv_heads: int = 2, hidden: int = 48,
               intermediate: int = 64, attn: str = "sdpa", seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=kind == "llama")
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=hidden // heads))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        raise ValueError(kind)
    model.config._attn_implementation = attn
    # random init is tiny; scale weights up so heads and channels differ enough to matter
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
            elif p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)  # Qwen2's q/k/v biases start at zero; give them values to slice
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    import random

    rnd = random.Random(0)
    words = " ".join(CORPUS).split()
    path.write_text(" ".join(rnd.choice(words) for _ in range(6000)), encoding="utf-8")
    return path


@pytest.fixture(params=["llama", "qwen2"])
def tiny_folder(request, tmp_path, tokenizer) -> Path:
    """A tiny model saved as a local HF folder, one per architecture family."""
    folder = tmp_path / f"tiny-{request.param}"
    model = make_model(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # one cache per test session: the stdlib corpus is built once, nothing leaks into ~/.cache
    monkeypatch.setenv("ADAPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def searched_template(tmp_path_factory):
    """A finished 2-trial search on a tiny Llama, run once per test session (per session name: the study is
    named after it) and copied into each test that needs one, so every test starts from the same files."""
    import shutil

    from engine.config import SearchConfig
    from engine.search.driver import create_session, run_search
    from engine.session.store import Session

    built: dict[str, Path] = {}

    def copy_to(root: Path, name: str) -> Session:
        if name not in built:
            base = tmp_path_factory.mktemp(f"searched-{name}")
            folder = base / "tiny"
            make_model("llama").save_pretrained(folder)
            make_tokenizer().save_pretrained(folder)
            cfg = SearchConfig(model=str(folder), trials=2, objective_windows=2, pool_size=12, device="cpu",
                               sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("ADAPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
                run_search(create_session(base / "sessions", name, cfg))
            built[name] = base / "sessions" / name
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built[name], root / name)
        return Session.open(root, name)

    return copy_to
