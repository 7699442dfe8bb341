"""Atomic outputs: whole or absent, durable, swapped in one step, with the process umask's permissions."""
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from defend.atomic import atomic_dir, exchange, write_json, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_honour_the_umask_not_the_temp_files_privacy(tmp_path, umask_022):
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"k": 1})
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner.txt").write_text("y")
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))  # safetensors 0.8: written 0600
        (tmp / "elsewhere").symlink_to(outside := tmp_path / "outside.txt")
        outside.write_text("not the folder's")
        os.chmod(outside, 0o600)
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.json") == 0o644
    assert mode(tmp_path / "folder") == 0o755 and mode(tmp_path / "folder" / "inner.txt") == 0o644
    assert mode(tmp_path / "folder" / "sub") == 0o755 and mode(tmp_path / "folder" / "sub" / "model.safetensors") == 0o644
    assert mode(tmp_path / "outside.txt") == 0o600  # a link's target is left as it is
    os.umask(0o002)  # a group-shared project directory
    write_text(tmp_path / "c.txt", "z")
    assert mode(tmp_path / "c.txt") == 0o664


def test_a_folder_is_exchanged_in_one_step_and_a_failed_write_keeps_the_old_one(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old folder left behind


def test_exchange_swaps_two_folders_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").touch()
    (b / "from_b").touch()
    assert exchange(a, b)  # Linux: renameat2(RENAME_EXCHANGE)
    assert [p.name for p in a.iterdir()] == ["from_b"] and [p.name for p in b.iterdir()] == ["from_a"]
