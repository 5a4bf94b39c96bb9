"""Writing outputs: atomically (temp file beside the target, then rename), never over an input.

A folder that cannot be made (a file is in the way, no permission) or an output path that is a
folder is a one-line `YoloCompressError`, as is an output that would replace one of the command's
own inputs (`refuse_overwrite`: paths compared after resolving symlinks and '..').
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import YoloCompressError

__all__ = ["atomic_open", "make_dir", "refuse_overwrite"]


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
