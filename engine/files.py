"""Writes that are all or nothing: a file or folder is built beside its destination under a temporary name
and renamed into place, so a crash at any moment leaves the old version or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the whole file to a temporary sibling of `path`, which then replaces `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: object, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=indent is not None) + "\n")


@contextlib.contextmanager
def atomic_folder(dest: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; when the block ends without an error it becomes `dest`
    (an existing `dest` is removed first only with `replace`). On an error it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir applies the user's umask (mkdtemp would make it 0700: a team sharing an export could not read it)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        yield tmp
        # safetensors writes 0600 files: give every file the mode the user's umask gives (the folder's, less x)
        mode = tmp.stat().st_mode & 0o666
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(mode)
        if replace and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
