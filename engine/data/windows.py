"""Token windows cut from text: tokenising, random calibration windows, evaluation windows, self-sampled text.

The text itself (specs, sources, files) is `engine.data.text`, which needs no torch, so inputs can be checked
before anything heavy loads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.config import SELF
from engine.control import Control
from engine.data.text import calib_parts, load_text, parse_spec, text_hash
from engine.errors import AdapruneError
from engine.events import Sink, Stage, null_sink


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All of `text` as one 1-D id tensor (no special tokens), tokenised in chunks to bound memory."""
    ids: list[int] = []
    chunk = 200_000
    for start in range(0, len(text), chunk):
        ids.extend(tokenizer(text[start : start + chunk], add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n windows of seq_len tokens at random offsets (LLM-Pruner's calibration sampling), reproducible by seed."""
    if ids.numel() < seq_len + 1:
        raise AdapruneError(
            f"calibration text has {ids.numel()} tokens, fewer than one {seq_len}-token window: give more text"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows; with a limit, evenly spaced ones so a prefix of the text does not decide."""
    total = ids.numel() // seq_len
    if total == 0:
        raise AdapruneError(f"evaluation text has {ids.numel()} tokens, fewer than one {seq_len}-token window")
    windows = ids[: total * seq_len].view(total, seq_len)
    if max_windows is not None and max_windows < total:
        pick = torch.linspace(0, total - 1, max_windows).round().long()
        windows = windows[pick]
    return windows


SAMPLE_BATCH = 64  # sequences sampled together: a decode step costs nearly the same for 16 or 64 on a CPU


def sample_self(
    model, tokenizer, n: int, seq_len: int, seed: int, batch_size: int = SAMPLE_BATCH,
    on_batch: Callable[[int], None] | None = None, control: Control | None = None,
) -> torch.Tensor:
    """n sequences of seq_len tokens sampled from the model itself, starting from BOS (or EOS if none).
    `on_batch` hears the samples done so far (fractions of a batch included, as whole samples) after every
    token; a pause or cancel of `control` is obeyed between tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise AdapruneError("'self' text needs a tokenizer with a BOS or EOS token")
    device = next(model.parameters()).device
    control = control or Control()
    torch.manual_seed(seed)
    out = []

    class Step(StoppingCriteria):  # generate's only hook between tokens: never stops it, reports and obeys
        def __init__(self, done: int, b: int) -> None:
            self.done, self.b = done, b

        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            control.checkpoint()
            if on_batch:
                on_batch(self.done + self.b * (input_ids.shape[1] - 1) // seq_len)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    for i in range(0, n, batch_size):
        control.checkpoint()
        b = min(batch_size, n - i)
        prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
        with torch.inference_mode():
            # an explicit mask: a prompt that is all BOS (= the pad id here) otherwise reads as right-padding
            seq = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=1.0, top_k=0, temperature=1.0,
                max_new_tokens=seq_len, min_new_tokens=seq_len, pad_token_id=start,
                stopping_criteria=StoppingCriteriaList([Step(i, b)]),
            )
        out.append(seq[:, 1 : seq_len + 1].cpu())
    return torch.cat(out)


def draw_windows(model, tokenizer, spec_text: str, seed: int, sink: Sink = null_sink,
                 stage: str = "sample self text", control: Control | None = None) -> tuple[torch.Tensor, str]:
    """The N random windows of L tokens a calibration spec `SOURCE:NxL` names (sampled from `model` for
    `self`), and the hash of the text they came from ("self" for sampled text). A mixed spec `A:NxL+B:MxL`
    gives A's windows then B's, and the hashes joined by '+'."""
    parts = calib_parts(spec_text)
    if len(parts) > 1:
        drawn = [draw_windows(model, tokenizer, p, seed, sink, stage, control) for p in parts]
        return torch.cat([w for w, _ in drawn]), "+".join(h for _, h in drawn)
    spec = parse_spec(spec_text)
    if spec.name == SELF:
        with Stage(sink, stage, spec.n, "samples") as st:
            return sample_self(model, tokenizer, spec.n, spec.seq_len, seed, on_batch=st.advance,
                               control=control), SELF
    text = load_text(spec, "calib")
    return random_windows(tokenize(tokenizer, text), spec.n, spec.seq_len, seed), text_hash(text)
