"""Writes that are all or nothing: a file or folder is built beside its destination under a temporary name
and renamed into place, so a crash at any moment leaves the old version or the new one, never half of one.
A crash leaves its temporary behind; the next write of the same destination removes it."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.errors import AdapruneError
from engine.faults import crash_point


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")


def clear_stale(folder: Path, pattern: str = "*") -> None:
    """Remove the temporaries of destinations matching `pattern` in `folder` that a dead process left (its pid
    is in their name)."""
    for old in folder.glob(f".{pattern}.tmp*"):
        pid = old.name.rpartition(".tmp")[2].partition(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _clear_stale(dest: Path) -> None:
    clear_stale(dest.parent, glob.escape(dest.name))


# a full disk, a quota, a read-only or foreign folder: the user's to fix, said in one line
_STORAGE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def storage(path: Path) -> Iterator[None]:
    """Turn a write that the disk refuses into one line naming the file and the fix."""
    try:
        yield
    except OSError as e:
        if e.errno not in _STORAGE:
            raise
        what = ("no space left" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
                f"{e.strerror.lower()} (make the folder writable)")
        raise AdapruneError(f"cannot write {path}: {what}; fix that and run it again (what was saved before is "
                            f"intact; a search or recovery resumes where it stopped)") from None


def write_tensors_atomic(path: Path, tensors: dict) -> None:
    """A safetensors file of `tensors`, whole or not at all."""
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the whole file to a temporary sibling of `path`, which then replaces `path`."""
    with storage(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(path)
        tmp = _tmp_name(path)
        try:
            write(tmp)
            crash_point("write", str(path))
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
    (an existing `dest` is replaced only with `replace`). On an error it is removed."""
    with storage(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(dest)
        tmp = _tmp_name(dest)
        tmp.mkdir()  # applies the user's umask (mkdtemp makes 0700: a team sharing an export could not read it)
    try:
        with storage(dest):
            yield tmp
            # safetensors writes 0600 files: every file gets the mode the user's umask gives (the folder's, no x)
            mode = tmp.stat().st_mode & 0o666
            for f in tmp.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    f.chmod(mode)
            crash_point("write", str(dest))
            old = None
            if replace and dest.exists():  # moved aside, not deleted first: the window without `dest` stays short
                old = _tmp_name(dest)
                os.replace(dest, old)
            os.replace(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
