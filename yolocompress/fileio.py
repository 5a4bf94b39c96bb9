"""Atomic file writes: write to a temp file beside the target, then rename over it.

Temp files are named `.<target name>.<writer pid>.<random>.tmp`, so a folder's orphans (left by a
killed writer) can be told from a live writer's: `remove_stale_temps` deletes those whose pid is
no longer running.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path

__all__ = ["atomic_open", "remove_stale_temps"]

_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")
_LEGACY = re.compile(r"^\..+\.[^.]+\.tmp$")
LEGACY_STALE_S = 3600.0     # pid-less temps (older versions) are stale after this long


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
    """Open a temp file for writing; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the orphaned atomic-write temp files directly in `folder`: those whose writer pid
    is not running (a pid reused by another process keeps its file: the safe side), and pid-less
    ones of older versions once `LEGACY_STALE_S` old. Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m:
            stale = not _alive(int(m["pid"]))
        elif _LEGACY.match(p.name):
            stale = time.time() - p.stat().st_mtime > LEGACY_STALE_S
        else:
            continue
        if stale and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
    return removed
