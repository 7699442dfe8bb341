"""Writes that never leave a half-written artifact: write to a temp path, make it durable, then rename.

Every file is fsynced before its rename and its folder after it, so a finished write survives a
crash or power loss; a folder replaces an existing one in one atomic exchange (Linux
``renameat2(RENAME_EXCHANGE)``), so readers see the old folder or the new one, never neither. Outputs
get the permissions of an ordinary file or folder under the process umask (temp files are created
private, 0600/0700, and opened up before the rename), so a group can share a project directory.
Temp names carry their writer's host and pid (``.<name>.<host>-<pid>.<random>.tmp``): what a killed
writer left behind is removed by the next folder write there (``clear_leftovers``).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owner() -> str:
    """This process, as temp names carry it: host, pid namespace and pid (a leftover of a dead process
    can go; containers that share a host name and a filesystem have their own pid namespaces)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}-{namespace}-{os.getpid()}"


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{_owner()}."


def clear_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temp files and folders that processes of this host left in ``folder`` when they were
    killed mid-write (their pid is gone); returns what was removed. Live writers' temps stay."""
    host = _owner().rsplit("-", 1)[0]  # host and pid namespace: only this namespace's pids can be checked
    removed = []
    for item in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else []:
        found = re.search(rf"\.{re.escape(host)}-(\d+)\.[^.]*\.tmp$", item.name)
        if not found or _alive(int(found.group(1))):
            continue
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def settle_tree(root: Path) -> None:
    """Every file and folder under ``root`` (``root`` too) made durable, bottom up, with an ordinary
    file's or folder's permissions under the umask: libraries write some private (safetensors 0.8's
    ``save_file`` creates its weights 0600), and a group sharing the output could not read them. A
    link is fsynced through, its target's mode left alone (not the folder's to change)."""
    mask = current_umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                if not os.path.islink(path):
                    executable = os.fstat(fd).st_mode & stat.S_IXUSR
                    os.fchmod(fd, (0o777 if executable else 0o666) & ~mask)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(folder, 0o777 & ~mask)
        fsync_dir(folder)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole, durably. What killed
    writes left beside it before is cleared first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        settle_tree(tmp)
        if path.exists() and exchange(tmp, path):
            pass  # tmp now holds the old folder, removed below
        else:
            if path.exists():  # no atomic exchange here: the old folder goes first
                shutil.rmtree(path)
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
