"""A session on disk: the contract between the engine, the CLI, the app and extra workers.

sessions/<name>/
  session.json   manifest: schema_version, config, status (written to a temp file, then os.replace)
  study.db       the Optuna study (SQLite) unless the config names another storage
  events.jsonl   append-only log of engine events, one JSON object per line
  stats/         cached calibration pools and the like, as safetensors
  plan.json      the best plan so far (every kept index)
  lock           {"pid", "host"} of the process driving the search (workers join without it)
Never pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import AdapruneError
from engine.events import Event, Sink, StageProgress
from engine.faults import crash_point, die, due
from engine.files import pid_alive, storage, write_json_atomic
from engine.session.activity import me

SCHEMA_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise AdapruneError(f"session name {name!r}: use letters, digits, '.', '_' or '-' (up to 64), starting "
                            f"with a letter or digit")


def default_dir() -> Path:
    return Path(os.environ.get("ADAPRUNE_SESSIONS", "sessions"))


CREATING = ".creating"  # the creating process's pid, until session.json makes the folder a session


def _creator(path: Path) -> int | None:
    """The pid that is creating the folder `path` (alive or not), or None when it is not being created."""
    try:
        pid = (path / CREATING).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(pid) if pid.isdigit() else 0  # a marker cut short: its writer died before the first byte was out


def _ends_torn(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


@dataclass
class Session:
    path: Path
    _progress_logged: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def manifest_path(self) -> Path:
        return self.path / "session.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def stats_dir(self) -> Path:
        return self.path / "stats"

    # --- creating and opening ------------------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, name: str, config: dict, fill: Callable[[Session], None] | None = None) -> Session:
        """A new session folder. `fill` writes what it starts with (its study) before session.json, which makes
        it a session that listings open: nothing reads a half-made one, and a failed fill leaves nothing."""
        path = root / name
        if cls.check_free(root, name):
            shutil.rmtree(path)  # its creator was killed before it was a session: nothing in it is complete
        made_root = not root.exists()
        path.mkdir(parents=True, mode=0o700)  # the user's text and samples: theirs alone (parents as umask says)
        try:
            (path / CREATING).write_text(str(os.getpid()), encoding="utf-8")
            (path / "stats").mkdir()
            if fill is not None:
                fill(cls(path))
            now = time.time()
            write_json_atomic(path / "session.json", {"schema_version": SCHEMA_VERSION, "name": name,
                                                      "config": config, "status": "created", "created": now,
                                                      "updated": now})
            (path / CREATING).unlink()
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            if made_root:  # a refused first session leaves no empty sessions folder either
                with contextlib.suppress(OSError):
                    root.rmdir()
            raise
        return cls(path)

    @staticmethod
    def check_free(root: Path, name: str) -> bool:
        """Refuse a name that is taken; True when the folder is what a killed creation left (create replaces it)."""
        check_name(name)
        path = root / name
        if not path.exists():
            return False
        if (path / "session.json").exists():
            raise AdapruneError(f"session {name!r} exists in {root}: `adaprune resume {name}` continues it")
        creator = _creator(path)
        if creator is None:
            raise AdapruneError(f"{path} exists and is not a session: choose another name, or remove it")
        if creator and pid_alive(creator):
            raise AdapruneError(f"session {name!r} is being created by process {creator}: wait for it, or choose "
                                f"another name")
        return True

    @classmethod
    def open(cls, root: Path, name: str) -> Session:
        path = root / name
        if not (path / "session.json").is_file():
            known = ", ".join(sorted(p.name for p in root.iterdir() if (p / "session.json").is_file())) if root.is_dir() else ""
            raise AdapruneError(f"no session {name!r} in {root}" + (f" (sessions: {known})" if known else ""))
        session = cls(path)
        session.manifest()  # validates
        return session

    def manifest(self) -> dict:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise AdapruneError(f"{self.manifest_path} is corrupt ({type(e).__name__}): restore it or start a new session") from None
        if not isinstance(data, dict) or "schema_version" not in data or "config" not in data:
            raise AdapruneError(f"{self.manifest_path} is not an adaprune session manifest")
        if data["schema_version"] > SCHEMA_VERSION:
            raise AdapruneError(
                f"session {self.name!r} was written by a newer adaprune (schema {data['schema_version']} > "
                f"{SCHEMA_VERSION}): upgrade adaprune to open it"
            )
        return data

    def config(self) -> dict:
        return self.manifest()["config"]

    def update(self, **fields: object) -> None:
        data = self.manifest()
        data.update(fields)
        data["updated"] = time.time()
        write_json_atomic(self.manifest_path, data)

    # --- events ---------------------------------------------------------------------------------------------

    def logged(self, outer: Sink, job: str | None = None) -> Sink:
        """`outer`, and every event also into the session's log (what `attach` and the app read), tagged with
        the `job` (search, recover, bench) that made it: one log holds them all, each screen follows its own."""

        def sink(event: Event) -> None:
            self.append_event(event, job)
            outer(event)

        return sink

    def append_event(self, event: Event, job: str | None = None) -> None:
        if isinstance(event, StageProgress):
            # high-rate: the log keeps about one a second per stage (and the last), enough for an attached app
            now = time.monotonic()
            if event.done < event.total and now - self._progress_logged.get(event.stage, 0.0) < 1.0:
                return
            self._progress_logged[event.stage] = now
        tags = {"by": me(), **({"job": job} if job else {})}  # which process, so viewers tell workers apart
        line = (json.dumps({**event.to_dict(), **tags}, default=str) + "\n").encode()
        with storage(self.events_path):
            crash_point("event", event.kind)
            with self.events_path.open("ab") as f:
                if f.tell() and _ends_torn(self.events_path):
                    f.write(b"\n")  # a crash cut the last line: the next event starts a line of its own
                if due("torn", event.kind):
                    f.write(line[: len(line) // 2])
                    f.flush()
                    die()
                f.write(line)

    def read_events(self) -> tuple[list[dict], list[int]]:
        """All readable events, and the line numbers of any that are corrupt (kept out, reported)."""
        events, bad = [], []
        if not self.events_path.exists():
            return events, bad
        for i, line in enumerate(self.events_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "kind" not in row:
                    raise ValueError
                events.append(row)
            except ValueError:
                bad.append(i)
        return events, bad

    @property
    def study_name(self) -> str:
        """The Optuna study's name: the session's first name (a renamed session keeps its study)."""
        try:
            return self.manifest().get("study_name") or self.name
        except AdapruneError:
            return self.name

    def follow_events(self, offset: int = 0) -> tuple[list[dict], int]:
        """Events appended since byte `offset` (whole lines only), and the new offset: how a viewer attaches to
        a session another process is driving, without taking it over."""
        if not self.events_path.exists():
            return [], offset
        with self.events_path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        events = []
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # corrupt lines are reported by read_events; a follower skips them
            if isinstance(row, dict) and "kind" in row:
                events.append(row)
        return events, offset + end

    def holder(self, what: str = "search") -> dict | None:
        """The live process driving this session's search or recovery ({"pid", "host", "what"}), or with
        `what="bench"` the one running its benchmark; None when there is none."""
        try:
            data = json.loads((self.path / _lock_file(what)).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        pid, host = data.get("pid"), data.get("host")
        if not isinstance(pid, int) or (host == socket.gethostname() and not pid_alive(pid)):
            return None
        return data

    def rename(self, new_name: str) -> Session:
        check_name(new_name)
        if self.holder() or self.holder("bench"):
            raise AdapruneError(f"session {self.name!r} is running: stop it before renaming")
        target = self.path.parent / new_name
        if target.exists():
            raise AdapruneError(f"a session named {new_name!r} exists already: choose another name")
        study = self.study_name
        os.replace(self.path, target)
        moved = Session(target)
        moved.update(study_name=study)  # the Optuna study keeps its name; the manifest says which it is
        return moved

    def delete(self) -> None:
        if self.holder() or self.holder("bench"):
            raise AdapruneError(f"session {self.name!r} is running: stop it before deleting")
        import shutil

        shutil.rmtree(self.path)

    # --- the driver's lock ----------------------------------------------------------------------------------

    def lock(self, what: str = "search") -> Iterator[None]:
        """Held while one process drives the session's `what` (its search, or its LoRA recovery); a benchmark
        holds a lock of its own (it may run beside a search, but two would write one table)."""
        return _Lock(self, what)

    # --- files ----------------------------------------------------------------------------------------------

    def write_json(self, name: str, data: dict) -> None:
        write_json_atomic(self.path / name, data)

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise AdapruneError(f"{path} is corrupt: delete it and re-run the step that writes it") from None


def _lock_file(what: str) -> str:
    return "bench.lock" if what == "bench" else "lock"


class _Lock:
    """One driving process per session; a dead holder's lock (same host) is taken over."""

    def __init__(self, session: Session, what: str = "search") -> None:
        self.path = session.path / _lock_file(what)
        self.session, self.what = session, what

    def __enter__(self) -> None:
        host = socket.gethostname()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    holder = {}
                pid, where, what = holder.get("pid"), holder.get("host"), holder.get("what", "search")
                if isinstance(pid, int) and (where != host or pid_alive(pid)):
                    join = f", or join it with `adaprune worker {self.session.name}`" if what == "search" else ""
                    raise AdapruneError(
                        f"session {self.session.name!r} is driven by pid {pid} on {where} (its {what}): wait for "
                        f"it or stop it{join}"
                    ) from None
                self.path.unlink(missing_ok=True)  # its holder died: take over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host, "since": time.time(), "what": self.what}, f)
            return
        raise AdapruneError(f"cannot lock session {self.session.name!r}: {self.path} keeps reappearing")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def list_sessions(root: Path) -> list[Session]:
    if not root.is_dir():
        return []
    return [Session(p) for p in sorted(root.iterdir()) if (p / "session.json").is_file()]
