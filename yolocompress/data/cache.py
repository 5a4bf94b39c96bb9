"""Parsed-annotation cache: one split's records in an .npz file (no pickle), reused while its key holds.

The key is a fingerprint of the descriptor (format, split, names, aliases, reader version, root) and
of the size and mtime of every input file (`formats.split_inputs`), so checking it parses nothing.
Files are written atomically; a stale, unreadable or corrupt cache is rebuilt without a word.
Location: $YOLOCOMPRESS_CACHE if set, else <root>/.yolocompress-cache if writable, else
$XDG_CACHE_HOME/yolocompress (default ~/.cache/yolocompress).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable

import numpy as np

from yolocompress.data.records import Record
from yolocompress.fileio import CACHE_ENV, user_cache_dir

__all__ = ["CACHE_ENV", "cache_dir", "fingerprint", "load_records", "save_records"]

_LAYOUT = 1                         # version of the .npz layout below
_log = logging.getLogger("yolocompress.data")


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def cache_dir(root: str) -> str:
    """The folder for the caches of the data set at `root` (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return str(user_cache_dir())
    local = os.path.join(root, ".yolocompress-cache")
    return local if _writable(local) else str(user_cache_dir())


def fingerprint(key: str, inputs: Iterable[str]) -> str:
    """sha256 of `key` and each input's path, size and mtime (or its absence)."""
    h = hashlib.sha256(key.encode())
    for path in inputs:
        try:
            st = os.stat(path)
            line = f"\n{path}\t{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            line = f"\n{path}\t-"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def save_records(path: str, fp: str, records: list[Record], issues: dict) -> bool:
    """Write records + the JSON-able issue report under fingerprint `fp`; False (logged) if it failed."""
    arrays = {
        "layout": np.array(_LAYOUT, np.int64),
        "fingerprint": np.array(fp),
        "issues": np.array(json.dumps(issues)),
        "image": np.array([r.image for r in records], dtype=str),
        "image_id": np.array([r.image_id for r in records], dtype=str),
        "size": np.array([(r.width, r.height) for r in records], np.int64).reshape(-1, 2),
        "count": np.array([len(r) for r in records], np.int64),
        "boxes": np.concatenate([r.boxes for r in records] + [np.zeros((0, 4), np.float32)]),
        "labels": np.concatenate([r.labels for r in records] + [np.zeros(0, np.int64)]),
        "difficult": np.concatenate([r.difficult for r in records] + [np.zeros(0, bool)]),
    }
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)                # mkstemp makes 0600; others may share the data set
        os.replace(tmp, path)
        return True
    except OSError as e:
        _log.info("annotation cache not written to %s: %s", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        return False


def load_records(path: str, fp: str) -> tuple[list[Record], dict] | None:
    """(records, issue report) stored under fingerprint `fp`, or None if absent, stale or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["layout"]) != _LAYOUT or str(z["fingerprint"]) != fp:
                return None
            images, ids, size, count = z["image"], z["image_id"], z["size"], z["count"]
            boxes, labels, difficult = z["boxes"], z["labels"], z["difficult"]
            issues = json.loads(str(z["issues"]))
        if not (len(images) == len(ids) == len(size) == len(count)
                and int(count.sum()) == len(boxes) == len(labels) == len(difficult)):
            raise ValueError("array lengths disagree")
        if not (isinstance(issues, dict) and isinstance(issues.get("counts"), dict)
                and isinstance(issues.get("examples"), dict)):
            raise ValueError("issue report malformed")
        splits = np.cumsum(count)[:-1]
        records = [Record(image=str(im), width=int(wh[0]), height=int(wh[1]), boxes=b, labels=lab,
                          difficult=d, image_id=str(i))
                   for im, i, wh, b, lab, d in zip(images, ids, size, np.split(boxes, splits),
                                                   np.split(labels, splits), np.split(difficult, splits))]
        return records, issues
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        _log.debug("annotation cache %s unusable, rebuilding: %s", path, e)
        return None
