"""The CUDA path in one run (issue 14): bf16 loading, CUDA statistics matching the CPU's, a pruned and repaired
export that reloads, a 3-trial search, and dense-vs-pruned speed and memory at 20% on the Llama-3-8B shape.

No network is needed: the models are random weights of real shapes built here (SmolLM2-135M's and Llama-3-8B's)
and the tokenizer is the tests' own. Every step is timed and runs even when an earlier one failed; the results go
to OUT/cuda_check.json and a Markdown section for bench/RESULTS.md is printed.

    python bench/cuda_check.py                         # on the device machine: cuda, the real shapes
    python bench/cuda_check.py --device cpu --tiny     # here: the same steps on small shapes, to check the script

On the device, optuna (not in its image) travels as wheels: `bash bench/cuda_wheels.sh` here fetches them into
.whl/ and says how the device run installs them; without them the search step says so and the others run.
Checked here with `--device cpu --tiny` (all five steps pass, 80 s on 2 cores); not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import make_tokenizer  # the tests' tokenizer: built here, no hub

from engine import api
from engine.config import PruneConfig, SearchConfig
from engine.measure.evaluate import perplexity, speed
from engine.model.load import Loaded, load
from engine.model.memory import Shape, plan_memory
from engine.model.structure import count_params
from engine.oneshot import evaluation_sets, plan_and_prune
from engine.prune.importance import collect_sample_stats, gradient_sums

SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0}
LLAMA8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True, "rope_theta": 10000.0}


def llama(shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on its device: an 8B model never exists in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- the steps: each returns its numbers, raising on a failed check ------------------------------------------


def step_load(ctx: dict) -> dict:
    """The small shape saved as a model folder, loaded in bf16 on the device through the engine's loader."""
    folder = ctx["tmp"] / "small"
    model = llama(ctx["small"], torch.float32, "cpu")
    model.save_pretrained(folder)
    ctx["tokenizer"].save_pretrained(folder)
    ctx["folder"] = folder
    loaded = load(str(folder), device=ctx["device"], dtype="bfloat16")
    p = next(loaded.model.parameters())
    ids = torch.randint(0, 300, (2, 32)).to(p.device)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert p.dtype == torch.bfloat16, p.dtype
    assert p.device.type == torch.device(ctx["device"]).type, p.device
    assert torch.isfinite(logits).all(), "non-finite logits"
    return {"params": count_params(loaded.model), "dtype": str(p.dtype), "device": str(p.device)}


def step_statistics(ctx: dict) -> dict:
    """Per-sample statistics and taylor gradient sums on the device match the CPU's (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    windows = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    got = {}
    for dev in ("cpu", ctx["device"]):
        model = llama(ctx["small"], torch.float32, dev).train(False)
        samples = collect_sample_stats(model, windows)
        keys = [f"{i}.{p}" for i in (0, len(model.model.layers) - 1) for p in ("q_proj", "down_proj")]
        grads, _ = gradient_sums(model, windows, keys)
        got[dev] = {**{k: v.float().cpu() for k, v in samples.items()}, **{f"grad {k}": v.cpu() for k, v in grads.items()}}
        del model
    worst = max((got["cpu"][k] - got[ctx["device"]][k]).abs().max().item() / max(got["cpu"][k].abs().max().item(), 1e-12)
                for k in got["cpu"])
    assert worst < 2e-3, f"device and CPU disagree: worst relative difference {worst:.2e}"
    return {"tensors compared": len(got["cpu"]), "worst relative difference": worst}


def step_prune_export(ctx: dict) -> dict:
    """`adaprune prune` with the repair, in bf16 on the device; the export reloads with the same PPL."""
    out = ctx["tmp"] / "pruned"
    cfg = PruneConfig(model=str(ctx["folder"]), prune=0.2, metric="taylor1", calib="stdlib-docs:8x64",
                      evals=["stdlib-docs"], eval_windows=4, device=ctx["device"], dtype="bfloat16",
                      reconstruct=True, reconstruct_calib="stdlib-docs:8x64", out=str(out), force=True,
                      measure_memory=ctx["device"].startswith("cuda"))
    t0 = time.perf_counter()
    r = api.prune(cfg)
    seconds = time.perf_counter() - t0
    again = load(str(out), device=ctx["device"], dtype="bfloat16")
    sets, _ = evaluation_sets(again.tokenizer, cfg)
    reloaded = {k: perplexity(again.model, v) for k, v in sets.items()}
    for k, v in reloaded.items():
        assert abs(v - r.pruned.ppl[k]) <= 1e-2 * r.pruned.ppl[k], f"reloaded PPL {v} against {r.pruned.ppl[k]}"
    return {"seconds": seconds, "removed": f"{r.plan.removed / r.plan.params_before:.2%}", "format": r.export_format,
            "dense PPL": r.dense.ppl, "pruned PPL": r.pruned.ppl, "reloaded PPL": reloaded,
            "peak MiB dense/pruned": [r.dense.peak_mib, r.pruned.peak_mib]}


def step_search(ctx: dict) -> dict:
    """A 3-trial search on the device, trial 0 (LLM-Pruner's recipe) and trial 1 (obs + repair) included."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        return {"skipped": "optuna is not installed here: carry it as wheels (see the device README)"}
    cfg = SearchConfig(model=str(ctx["folder"]), trials=3, sources=["stdlib-docs"], objective=["stdlib-docs/valid"],
                       objective_windows=4, device=ctx["device"], dtype="bfloat16")
    session = api.create_session(ctx["tmp"] / "sessions", "cuda", cfg)
    t0 = time.perf_counter()
    done = api.run_search(session)
    best = done["best"]
    assert done["completed"] == 3, done
    return {"seconds": time.perf_counter() - t0, "best trial": best[0], "best objective": best[1]}


def step_big_speed(ctx: dict) -> dict:
    """Dense against 20% pruned on the Llama-3-8B shape in bf16: prefill and decode speed, peak memory."""
    device = ctx["device"]
    reset_peak(device)
    model = llama(ctx["big"], torch.bfloat16, device)
    loaded = Loaded(model, ctx["tokenizer"], "llama-3-8b shape", None, torch.device(device), torch.bfloat16)
    out: dict = {"params dense": count_params(model), "weights MiB dense": peak_mib(device)}
    # the memory plan's estimate (config alone) beside what the device measured
    est = plan_memory(Shape.of(model.config.to_dict()), device, "bfloat16", "prune", gradients=False, repair=False,
                      obs=False)
    out["plan: dense MiB"] = round(dict(est.lines)["dense"] / 2**20)
    out["plan: peak MiB (prune, l2)"] = round(est.peak / 2**20)
    vocab = ctx["big"]["vocab_size"]
    for label in ("dense", "pruned"):
        if label == "pruned":
            t0 = time.perf_counter()
            plan, _ = plan_and_prune(loaded, PruneConfig(prune=0.2, metric="l2", calib="stdlib-docs:4x64",
                                                         layers="all", device=device))
            sync(device)
            out["prune seconds"] = time.perf_counter() - t0
            out["params pruned"] = count_params(model)
            out["removed"] = f"{plan.removed / plan.params_before:.2%}"
        reset_peak(device)
        for batch in (1, 4):
            s = speed(model, vocab, batch=batch, prompt_len=128, new_tokens=32)
            out[f"{label} prefill tok/s b{batch}"] = round(s.prefill_tok_s)
        out[f"{label} decode tok/s b1"] = round(s.decode_tok_s, 1)  # decode and TTFT are measured at batch 1
        out[f"{label} TTFT ms"] = round(s.ttft_s * 1000, 1)
        out[f"peak MiB {label}"] = peak_mib(device)
    return out


STEPS = [("load bf16", step_load), ("device vs CPU statistics", step_statistics),
         ("prune + repair + export + reload", step_prune_export), ("3-trial search", step_search),
         ("8B shape: dense vs pruned speed and memory", step_big_speed)]


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "cpu cores": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu memory GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes for both models (a check of the script)")
    ap.add_argument("--big-layers", type=int, default=None, help="layers of the 8B shape (default: all 32)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", tempfile.gettempdir())))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("ADAPRUNE_CACHE", tempfile.mkdtemp(prefix="adaprune-cache-"))
    big = dict(TINY if args.tiny else LLAMA8B)
    if args.big_layers:
        big["num_hidden_layers"] = args.big_layers
    ctx = {"device": args.device, "small": TINY if args.tiny else SMOL, "big": big, "tokenizer": make_tokenizer(),
           "tmp": Path(tempfile.mkdtemp(prefix="cuda-check-"))}
    report = {"environment": environment(args.device), "steps": {}}
    started = time.perf_counter()
    for name, fn in STEPS:
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **fn(ctx)}
        except Exception as e:  # every step runs: one failure must not hide what the others show
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                      "where": traceback.format_exc().splitlines()[-3:]}
        result["wall s"] = round(time.perf_counter() - t0, 1)
        report["steps"][name] = result
        print(json.dumps({name: result}, default=str), flush=True)
    report["total s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = [f"## cuda_check.py — {time.strftime('%Y-%m-%d')}", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()) + ".", "",
             "| step | ok | wall s | numbers |", "|---|---|---|---|"]
    for name, r in report["steps"].items():
        numbers = {k: v for k, v in r.items() if k not in ("ok", "wall s", "where")}
        lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['wall s']} | "
                     f"{json.dumps(numbers, default=str)[:600]} |")
    print("\n".join(lines))
    sys.exit(0 if all(r["ok"] for r in report["steps"].values()) else 1)


if __name__ == "__main__":
    main()
