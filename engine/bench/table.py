"""A session's benchmark results as a table, Markdown, CSV and plots (terminal and PNG)."""

from __future__ import annotations

from pathlib import Path

from engine.errors import AdapruneError

ROWS = ["dense", "best", "recovered", "baseline", "oneshot", "oneshot-repaired", "magnitude", "random"]


def mismatched(results: dict) -> dict[tuple[str, str], str]:
    """(row, PPL key) -> why that cell is not comparable with its column: measured on other windows or another
    text than dense's (or, without dense, than most rows'). A later run with other settings that measured only
    some rows leaves such cells."""
    rows = results.get("rows", {})
    out: dict[tuple[str, str], str] = {}
    for key in sorted({k for r in rows.values() for k in r.get("ppl", {})}):
        how = {n: (p.get("windows"), p.get("tokens"), p.get("sha256")) for n, r in rows.items()
               if (p := r.get("ppl", {}).get(key))}
        ref_name = "dense" if "dense" in how else None
        ref = how["dense"] if ref_name else max(set(how.values()), key=list(how.values()).count)
        for name, h in how.items():
            if h != ref:
                theirs = f"{ref[0]} windows" + ("" if h[2] == ref[2] else ", another text")
                out[name, key] = (f"{h[0]} windows" + ("" if h[2] == ref[2] else " of another text") +
                                  f" ({ref_name or 'most rows'}: {theirs})")
    return out


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison, as strings (Markdown, CSV and the terminal share it)."""
    rows = results.get("rows", {})
    order = [n for n in ROWS if n in rows] + sorted(n for n in rows if n not in ROWS)
    ppl_keys = sorted({k for r in rows.values() for k in r.get("ppl", {})})
    task_keys = sorted({k for r in rows.values() for k in r.get("zeroshot", {})})
    batches = sorted({b for r in rows.values() for b in r.get("speed", {}).get("prefill_tok_s", {})}, key=int)
    has_speed = any("speed" in r for r in rows.values())
    has_mem = any(r.get("memory_mib") for r in rows.values())
    dense = rows.get("dense", {})
    header = ["row", "params", "params %"] + [f"PPL {_label(k)}" for k in ppl_keys] + [f"acc {k}" for k in task_keys]
    if task_keys:
        header += ["acc avg", "retention"]
    if has_speed:
        header += [f"prefill tok/s b{b}" for b in batches] + ["decode tok/s", "TTFT ms"]
    if has_mem:
        header += ["peak MiB"]
    body = []
    odd = mismatched(results)  # cells measured otherwise than their column: marked, explained in the provenance
    total = results.get("dense_params") or dense.get("params")
    for name in order:
        r = rows[name]
        shown = f"{name} ({r['recovery_loss']})" if r.get("recovery_loss") else name
        shown += " (outdated)" if r.get("outdated") else ""
        line = [shown, f"{r['params']:,}", f"{r['params'] / total:.1%}" if total else ""]
        line += [_f(r.get("ppl", {}).get(k, {}).get("value"), ".2f") + (" *" if (name, k) in odd else "")
                 for k in ppl_keys]
        accs = {k: r.get("zeroshot", {}).get(k, {}).get("acc") for k in task_keys}
        line += [_f(accs[k], ".3f") for k in task_keys]
        if task_keys:
            avg, ret = average_and_retention(r, dense, task_keys)
            line += [_f(avg, ".3f"), _f(ret, ".1%")]
        if has_speed:
            sp = r.get("speed", {})
            line += [_f(sp.get("prefill_tok_s", {}).get(b), ",.0f") for b in batches]
            line += [_f(sp.get("decode_tok_s"), ",.1f"), _f(sp.get("ttft_ms"), ",.0f")]
        if has_mem:
            line += [_f(r.get("memory_mib"), ",.0f")]
        body.append(line)
    return header, body


def average_and_retention(row: dict, dense: dict, task_keys: list[str]) -> tuple[float | None, float | None]:
    """Mean accuracy over the tasks the row has; retention = that mean over dense's on the same tasks."""
    mine = {k: row.get("zeroshot", {}).get(k, {}).get("acc") for k in task_keys}
    mine = {k: v for k, v in mine.items() if v is not None}
    if not mine:
        return None, None
    avg = sum(mine.values()) / len(mine)
    base = [dense.get("zeroshot", {}).get(k, {}).get("acc") for k in mine]
    if any(b is None for b in base) or not base or not sum(base):
        return avg, None
    return avg, avg / (sum(base) / len(base))


def _f(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _label(key: str) -> str:
    """A PPL column's short name: a file's name rather than its whole path (the provenance has the path)."""
    text, _, n = key.rpartition("@")
    return f"{Path(text).name if '/' in text else text}@{n}"


def provenance(results: dict) -> list[str]:
    """How the numbers were made, each fact once: environments, text and task sources, and each row's plan."""
    rows = results.get("rows", {})
    envs, sources = {}, {}
    for name, r in rows.items():
        env = ", ".join(f"{k} {v}" for k, v in r.get("env", {}).items() if v)
        envs.setdefault(env, []).append(name)
        for key, p in r.get("ppl", {}).items():
            sources[f"PPL {key}: {p['windows']} windows x {p['seq_len']} tokens, text sha256 {p['sha256']}"] = 1
        for key, z in r.get("zeroshot", {}).items():
            limit = f"{z['n']} rows (seed {z['seed']})" if z.get("limit") else f"all {z['n']} rows"
            left = z.get("objective_rows_left_out")
            extra = f", {left} rows the search objective used left out" if left else ""
            sources[f"{key}: lm-eval {z['lm_eval_version']}, {limit}{extra}, {z['source']}"] = 1
    lines = [f"{', '.join(names) if len(envs) > 1 else 'all rows'}: {env}" for env, names in envs.items()]
    lines += list(sources)
    lines.append("plans: " + ", ".join(f"{n} {r.get('plan_id')}" for n, r in rows.items()))
    lines += [f"{n} is outdated: {r['outdated']} (its numbers are of the model it measured then; bench measures "
              f"it again)" for n, r in rows.items() if r.get("outdated")]
    lines += [f"* PPL {key} of {n} was measured on {why}: not comparable with its column (bench with the same "
              f"settings and --rows {n} measures it again)" for (n, key), why in mismatched(results).items()]
    return lines


def to_markdown(results: dict) -> str:
    header, body = table(results)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out) + "\n\n" + "\n".join(f"- {ln.strip()}" for ln in provenance(results)) + "\n"


def to_csv(results: dict) -> str:
    import csv
    import io

    header, body = table(results)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([[c.replace(",", "") if i and c[:1].isdigit() else c for i, c in enumerate(line)] for line in body])
    return buf.getvalue()


def plot_points(results: dict) -> dict[str, list[tuple[str, int, float]]]:
    """Per measure (average accuracy, each PPL text): (row, parameters, value) for the rows that have it."""
    rows = results.get("rows", {})
    dense = rows.get("dense", {})
    task_keys = sorted({k for r in rows.values() for k in r.get("zeroshot", {})})
    points: dict[str, list[tuple[str, int, float]]] = {}
    for name, r in rows.items():
        avg, _ = average_and_retention(r, dense, task_keys)
        if avg is not None:
            points.setdefault("accuracy (avg)", []).append((name, r["params"], avg))
        for key, p in r.get("ppl", {}).items():
            points.setdefault(f"PPL {key}", []).append((name, r["params"], p["value"]))
    return points


def plot_png(results: dict, path: Path) -> None:
    """Accuracy vs parameters and PPL vs parameters, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    points = plot_points(results)
    if not points:
        raise AdapruneError("nothing to plot yet: run the benchmark with --tasks or --ppl first")
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4), squeeze=False)
    for ax, (measure, pts) in zip(axes[0], points.items(), strict=True):
        for name, params, value in pts:
            ax.scatter(params / 1e6, value)
            ax.annotate(name, (params / 1e6, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(measure)
        if measure.startswith("PPL"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot_text(results: dict, width: int = 78, height: int = 14) -> str:
    """The same plots for the terminal (plotext), plain characters: each row drawn with its own digit."""
    import plotext as plt

    out = []
    for measure, pts in plot_points(results).items():
        plt.clear_figure()
        plt.plotsize(width, height)
        plt.theme("clear")
        for i, (name, params, value) in enumerate(pts):
            plt.scatter([params / 1e6], [value], label=f"{name}", marker=str(i % 10))
        plt.title(f"{measure} vs parameters (M)")
        out.append(plt.uncolorize(plt.build()))
    return "\n".join(out)

