"""All-or-nothing writes: a failure part-way leaves the previous version and no temporary file behind."""

import json
import os
import stat

import pytest
import torch

from engine.files import atomic_folder, write_atomic, write_json_atomic


def test_json_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a" / "state.json"
    write_json_atomic(path, {"step": 1})
    assert json.loads(path.read_text()) == {"step": 1}

    def half(tmp):
        tmp.write_text('{"step": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_folder_appears_only_when_complete(tmp_path):
    dest = tmp_path / "export"
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-export")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in dest.iterdir()] == ["config.json"]


def test_folder_replaces_an_old_one_only_when_asked(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "old").write_text("x")
    with pytest.raises(OSError), atomic_folder(dest) as tmp:  # a non-empty folder cannot be renamed over
        (tmp / "new").write_text("y")
    assert [p.name for p in dest.iterdir()] == ["old"]
    with atomic_folder(dest, replace=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in dest.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_folder_and_its_files_take_the_users_umask(tmp_path, umask):
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "export") as tmp:
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))  # safetensors writes 0600
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    dest = tmp_path / "export"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~umask
    for name in ("sub/model.safetensors", "config.json"):
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o666 & ~umask, name
