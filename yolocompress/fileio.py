"""Writing outputs: atomically (temp file beside the target, then rename), never over an input.

A folder that cannot be made (a file is in the way, no permission) or an output path that is a
folder is a one-line `YoloCompressError`, as is an output that would replace one of the command's
own inputs (`refuse_overwrite`: paths compared after resolving symlinks and '..').

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
from collections.abc import Iterable
from pathlib import Path

from .errors import YoloCompressError

__all__ = ["CACHE_ENV", "atomic_open", "make_dir", "refuse_overwrite", "remove_stale_temps", "user_cache_dir"]

_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")
_LEGACY = re.compile(r"^\..+\.[^.]+\.tmp$")
LEGACY_STALE_S = 3600.0     # pid-less temps (older versions) are stale after this long


CACHE_ENV = "YOLOCOMPRESS_CACHE"


def user_cache_dir() -> Path:
    """$YOLOCOMPRESS_CACHE if set, else $XDG_CACHE_HOME/yolocompress (default
    ~/.cache/yolocompress): the demo set, latency tables, and parsed annotations that cannot sit
    beside their data."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "yolocompress"


def make_dir(folder: str | os.PathLike) -> Path:
    """`mkdir -p folder`; a file in the way or a refused folder is a YoloCompressError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise YoloCompressError(f"{folder}: cannot create the folder: {blocker} is a file") from e
    except OSError as e:
        raise YoloCompressError(f"{folder}: cannot create the folder: {e.strerror or e}") from e
    return folder


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
    """Open a temp file for writing; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    if path.is_dir():
        raise YoloCompressError(f"{path}: is a folder; give a file name to write")
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                   suffix=".tmp")
    except OSError as e:
        raise YoloCompressError(f"{path}: cannot write: {e.strerror or e}") from e
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


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)        # hard links too
    except OSError:
        return False


def refuse_overwrite(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None]
                     ) -> None:
    """A YoloCompressError if any output path is one of the inputs (None inputs are ignored)."""
    given = [p for p in inputs if p is not None]
    for out in outputs:
        for inp in given:
            if _same(out, inp):
                raise YoloCompressError(f"{out}: is the input {inp}; writing it would destroy the "
                                        f"input, choose another output path")


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
