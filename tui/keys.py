"""Keys, from one source: each screen's BINDINGS (with an id and a tooltip) make the help and the palette, and
a keymap file remaps them by id (`{"sessions.delete": "D"}` in `~/.config/adaprune/keymap.json`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from textual.binding import Binding

NAMES = {"question_mark": "?", "escape": "esc", "enter": "enter", "space": "space"}


def keymap_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "adaprune" / "keymap.json"


def load_keymap(path: Path | None = None) -> tuple[dict[str, str], str | None]:
    """The user's remapped keys by binding id, and a problem with the file (shown once; defaults apply)."""
    path = path or keymap_path()
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {}, f"{path}: not readable JSON ({e}); using the default keys"
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return {}, f"{path}: expected an object of binding id -> keys; using the default keys"
    return data, None


def keys_of(binding: Binding, keymap: dict[str, str]) -> str:
    keys = keymap.get(binding.id or "", binding.key)
    return "/".join(NAMES.get(k.strip(), k.strip()) for k in keys.split(","))


def bindings(cls: type) -> list[Binding]:
    """The screen's commands: its bindings with a description (the hidden fallbacks that only say a key can do
    nothing now are not commands)."""
    return [b for b in getattr(cls, "BINDINGS", []) if isinstance(b, Binding) and b.description]


def help_rows(sections: list[tuple[str, type]], keymap: dict[str, str]) -> list[tuple[str, list[tuple[str, ...]]]]:
    """One block per screen: (key, what it does, binding id) in the order the bindings are declared (the id is
    what keymap.json remaps)."""
    return [(title, [(keys_of(b, keymap), b.tooltip or b.description, b.id or "") for b in bindings(cls)])
            for title, cls in sections]
