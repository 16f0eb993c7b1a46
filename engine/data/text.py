"""Text sources for calibration and evaluation, and the token windows cut from them.

A source spec is `NAME[/SPLIT][:NxL]`:
- `stdlib-docs`: built in and offline (Python's own documentation: `pydoc_data.topics` plus the docstrings of
  the standard library's source). Documents are split by a hash of their name into `calib` (70%), `valid`
  (10%, reserved for the search objective) and `test` (20%), so the three never share text.
- a local `.txt`, `.jsonl` (a `text` field per line, or Alpaca's instruction/input/output) or `.parquet` (a
  `text` column) file.
- a hub dataset by name: `wikitext2`, `ptb`, `c4`, `bookcorpus`, `alpaca` (through `datasets`).
- `self`: text sampled from the dense model itself.

Without `/SPLIT` the role decides: calibration reads the training part, evaluation the held-out part.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.config import SELF
from engine.errors import AdapruneError
from engine.files import write_json_atomic

Role = Literal["calib", "eval"]

STDLIB = "stdlib-docs"
SPLITS = ("calib", "valid", "test")

# name -> (datasets path, config, text builder, {role: split})
HUB: dict[str, tuple[str, str | None, str, dict[str, str]]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "eval": "test"}),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", {"calib": "train", "eval": "test"}),
    "c4": ("allenai/c4", "en", "text", {"calib": "train", "eval": "validation"}),
    "bookcorpus": ("bookcorpus", None, "text", {"calib": "train", "eval": "train"}),
    "alpaca": ("yahma/alpaca-cleaned", None, "alpaca", {"calib": "train", "eval": "train"}),
}
# c4 is huge: read one shard of each split, as SparseGPT/Wanda do.
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}

_SPEC = re.compile(r"^(?P<name>.+?)(?::(?P<n>\d+)x(?P<l>\d+))?$")


@dataclass(frozen=True)
class TextSpec:
    name: str
    split: str | None = None
    n: int | None = None
    seq_len: int | None = None

    def __str__(self) -> str:
        s = self.name + (f"/{self.split}" if self.split else "")
        return s + (f":{self.n}x{self.seq_len}" if self.n else "")


def parse_spec(spec: str) -> TextSpec:
    m = _SPEC.match(spec.strip())
    if not m or not m.group("name"):
        raise AdapruneError(f"cannot read text spec {spec!r}: use NAME[/SPLIT][:NxL], e.g. stdlib-docs:10x64")
    name, split = m.group("name"), None
    n = int(m.group("n")) if m.group("n") else None
    length = int(m.group("l")) if m.group("l") else None
    if n is not None and (n < 1 or length is None or length < 2):
        raise AdapruneError(f"text spec {spec!r}: N and L in :NxL must be positive (L at least 2)")
    head, _, tail = name.rpartition("/")
    if head and (head in (STDLIB, *HUB) or tail in SPLITS) and not Path(name).exists():
        name, split = head, tail
    return TextSpec(name, split, n, length)


def cache_dir() -> Path:
    root = Path(os.environ.get("ADAPRUNE_CACHE", Path.home() / ".cache" / "adaprune"))
    return root


# --- the built-in corpus --------------------------------------------------------------------------------


def _stdlib_documents() -> list[tuple[str, str]]:
    """(name, text) pairs: every pydoc topic, then docstrings of stdlib modules read with ast (no imports)."""
    import pydoc_data.topics

    docs = [(f"topic:{k}", v) for k, v in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = [ast.get_docstring(tree) or ""]
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:  # short docstrings are mostly one-line summaries
                    parts.append(doc)
        text = "\n\n".join(p for p in parts if p)
        if text:
            docs.append((f"module:{rel.as_posix()}", text))
    return _dedupe(docs)


def _dedupe(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep each paragraph once (docstrings repeat across modules): no text may sit in two splits."""
    seen: set[str] = set()
    out = []
    for name, text in docs:
        kept = []
        for para in text.split("\n\n"):
            key = para.strip()
            if key and key not in seen:
                seen.add(key)
                kept.append(para)
        if kept:
            out.append((name, "\n\n".join(kept)))
    return out


def _split_of(name: str) -> str:
    bucket = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10
    return "calib" if bucket < 7 else "valid" if bucket == 7 else "test"


def stdlib_docs(split: str) -> str:
    """One split of the built-in corpus, cached on disk per Python version (building it takes seconds)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = cache_dir() / "text" / f"stdlib-docs-v2-{version}.json"
    docs: list[tuple[str, str]] | None = None
    if path.exists():
        try:
            docs = [tuple(d) for d in json.loads(path.read_text(encoding="utf-8"))]
        except (ValueError, OSError):
            docs = None
    if docs is None:
        docs = _stdlib_documents()
        write_json_atomic(path, docs, indent=None)
    return "\n\n".join(text for name, text in docs if _split_of(name) == split)


# --- files and the hub -----------------------------------------------------------------------------------


def _read_txt(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise AdapruneError(f"{path} looks binary, not text: pass a UTF-8 .txt, .jsonl or .parquet file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapruneError(f"{path} is not UTF-8 text (byte {e.start}): re-encode it as UTF-8") from None


def _read_jsonl(path: Path, field: str) -> str:
    texts = []
    for lineno, line in enumerate(_read_txt(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise AdapruneError(f"{path}:{lineno}: not valid JSON; each line must be one JSON object") from None
        if isinstance(row, dict) and isinstance(row.get(field), str):
            texts.append(row[field])
        elif isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
            texts.append(_alpaca_text(row))  # instruction data (Alpaca's fields), as the hub's alpaca is read
        else:
            raise AdapruneError(f"{path}:{lineno}: expected an object with a string field {field!r} (or Alpaca's "
                                f"instruction/input/output)")
    return "\n\n".join(texts)


def _read_parquet(path: Path, field: str) -> str:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise AdapruneError(f"{path}: cannot read as parquet ({type(e).__name__}); check the file") from None
    if field not in table.column_names:
        raise AdapruneError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)})")
    return "\n\n".join(str(t) for t in table.column(field).to_pylist() if t)


def _alpaca_text(row: dict) -> str:
    prompt = row.get("instruction", "")
    if row.get("input"):
        prompt += "\n\n" + row["input"]
    return f"{prompt}\n\n{row.get('output', '')}"


def hub_text(name: str, split: str) -> str:
    """Load a named hub dataset split and join its text. Fails fast and clearly when the hub is unreachable."""
    import datasets

    path, config, field, _ = HUB[name]
    kwargs: dict = {"split": split}
    if name == "c4":
        kwargs["data_files"] = {split: C4_FILES.get(split, C4_FILES["validation"])}
    try:
        ds = datasets.load_dataset(path, config, **kwargs)
    except Exception as e:  # datasets wraps network failures in many types
        raise AdapruneError(
            f"cannot load hub dataset {name!r} ({type(e).__name__}): the hub may be unreachable; "
            f"pass a local .txt/.jsonl/.parquet file instead"
        ) from None
    texts = [_alpaca_text(r) for r in ds] if field == "alpaca" else [r[field] for r in ds]
    # WikiText-2 is joined exactly as LLM-Pruner/SparseGPT/Wanda evaluate it; PTB sentences with spaces
    return (" " if name == "ptb" else "\n\n").join(texts)


def load_text(spec: TextSpec | str, role: Role, field: str = "text") -> str:
    """The raw text of a source. `self` is not text on disk: use `sample_self` for it."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    name = spec.name
    if name == STDLIB:
        split = spec.split or ("calib" if role == "calib" else "test")
        if split not in SPLITS:
            raise AdapruneError(f"stdlib-docs has splits {', '.join(SPLITS)}, not {split!r}")
        text = stdlib_docs(split)
    elif name in HUB:
        text = hub_text(name, spec.split or HUB[name][3][role])
    elif name == SELF:
        raise AdapruneError("'self' text is sampled from the model; it cannot be read as a file")
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            known = ", ".join([STDLIB, SELF, *HUB])
            raise AdapruneError(f"text source {name!r} is neither a file nor a known name ({known})")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            text = _read_jsonl(path, field)
        elif suffix == ".parquet":
            text = _read_parquet(path, field)
        else:
            text = _read_txt(path)
    if not text.strip():
        raise AdapruneError(f"text source {spec} is empty: give it some text")
    return text


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_source(spec: str, role: Role) -> TextSpec:
    """Refuse a text spec that cannot be read, before any model loads: the spec's form, a built-in source's
    split, and a file read through (missing, empty, binary, not UTF-8, malformed JSONL, no such column).
    `self` passes (callers that cannot sample say so); hub datasets are checked when loaded (that needs the
    network, and `datasets` caches what it fetched)."""
    ts = parse_spec(spec)
    if ts.name == STDLIB:
        if ts.split is not None and ts.split not in SPLITS:
            raise AdapruneError(f"stdlib-docs has splits {', '.join(SPLITS)}, not {ts.split!r}")
    elif ts.name not in (SELF, *HUB):
        path = Path(ts.name).expanduser()
        key = (str(path.resolve()), *_stat(path), role)
        if key not in _READABLE:  # forms check on every key: read a file through once per version of it
            load_text(ts, role)
            _READABLE.add(key)
    return ts


_READABLE: set[tuple] = set()


def calib_parts(spec: str) -> list[str]:
    """The parts of a mixed calibration spec `A:NxL+B:MxL` (each part's windows drawn on its own, then joined);
    a spec whose pieces do not all carry a size is one spec (a file name may contain '+')."""
    parts = [p.strip() for p in spec.split("+")]
    if len(parts) > 1 and all(_SPEC.match(p) and _SPEC.match(p).group("n") for p in parts):
        return parts
    return [spec]


def check_calib(spec: str, flag: str = "--calib") -> list[TextSpec]:
    """A calibration spec with a size, possibly mixed from several sources of one window length."""
    out = []
    for part in calib_parts(spec):
        ts = parse_spec(part)
        if ts.n is None:
            raise AdapruneError(f"{flag} {spec!r} needs a size: add :NxL, e.g. {ts.name}:10x64")
        check_source(part, "calib")
        out.append(ts)
    if len({ts.seq_len for ts in out}) > 1:
        raise AdapruneError(f"{flag} {spec!r}: the mixed sources need one window length L in :NxL")
    return out


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)
