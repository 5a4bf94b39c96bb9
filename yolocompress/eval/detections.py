"""One image's detections (xyxy boxes in original-image pixels, scores, class indices) and their JSON file.

The file is the COCO results format: a JSON list of `{"image_id": <image file stem>, "category_id":
<class index>, "bbox": [x, y, w, h], "score": s}`. `category_id` is the 0-based index of the class in
the data set's `names` (not a COCO category id); `bbox` is in pixels of the original image.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from yolocompress.errors import YoloCompressError
from yolocompress.fileio import atomic_open

__all__ = ["Detections", "save_detections_json", "load_detections_json"]


@dataclass
class Detections:
    image_id: str                    # the image's Record.image_id (file stem)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    def __post_init__(self) -> None:
        if not isinstance(self.image_id, str) or not self.image_id:
            raise YoloCompressError(f"detections: image_id must be a non-empty string, got {self.image_id!r}")
        try:
            self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
            self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            labels = np.asarray(self.labels)
        except (TypeError, ValueError) as e:
            raise YoloCompressError(f"detections of {self.image_id}: {e}") from e
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise YoloCompressError(f"detections of {self.image_id}: labels must be integers, got {labels.dtype}")
        self.labels = labels.astype(np.int64).reshape(-1)
        n = len(self.boxes)
        if len(self.scores) != n or len(self.labels) != n:
            raise YoloCompressError(f"detections of {self.image_id}: {n} boxes but {len(self.scores)} scores "
                                    f"and {len(self.labels)} labels")
        if not (np.isfinite(self.boxes).all() and np.isfinite(self.scores).all()):
            raise YoloCompressError(f"detections of {self.image_id}: boxes and scores must be finite")
        if (self.boxes[:, 2] < self.boxes[:, 0]).any() or (self.boxes[:, 3] < self.boxes[:, 1]).any():
            raise YoloCompressError(f"detections of {self.image_id}: boxes must be xyxy with x2 >= x1 and y2 >= y1")
        if (self.labels < 0).any():
            raise YoloCompressError(f"detections of {self.image_id}: negative class index {self.labels.min()}")

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls, image_id: str) -> "Detections":
        """No detections for `image_id` (what an image absent from a results file has)."""
        return cls(image_id)


def save_detections_json(path: str | os.PathLike, dets: Iterable[Detections],
                         names: Sequence[str] | None = None) -> None:
    """Write `dets` as a COCO results file, atomically (temp file in the same folder + os.replace).

    With `names`, every label must index it and each entry also gets a `category_name` for humans
    (pycocotools ignores extra keys).
    """
    entries = []
    for d in dets:
        if names is not None and len(d) and d.labels.max() >= len(names):
            raise YoloCompressError(f"{os.fspath(path)}: detections of {d.image_id} have class index "
                                    f"{d.labels.max()} but there are {len(names)} class names")
        for (x1, y1, x2, y2), s, c in zip(d.boxes.astype(np.float64), d.scores, d.labels):
            entry = {"image_id": d.image_id, "category_id": int(c),
                     "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(s)}
            if names is not None:
                entry["category_name"] = names[c]
            entries.append(entry)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _entry_problem(e: object, names: Sequence[str] | None) -> str | None:
    """Why `e` is not a valid results entry, or None."""
    if not isinstance(e, dict):
        return f"is a {type(e).__name__}, not an object"
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in e]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(e["image_id"], str) or not e["image_id"]:
        return f"image_id {e['image_id']!r} is not a non-empty string (the image file stem)"
    c = e["category_id"]
    if not isinstance(c, int) or isinstance(c, bool) or c < 0:
        return f"category_id {c!r} is not a 0-based class index"
    if names is not None:
        if c >= len(names):
            return f"category_id {c} is out of range for {len(names)} classes"
        if "category_name" in e and e["category_name"] != names[c]:
            return f"category_name {e['category_name']!r} is not class {c} ({names[c]!r})"
    b = e["bbox"]
    if not isinstance(b, list) or len(b) != 4 or not all(_is_number(v) for v in b):
        return f"bbox {b!r} is not 4 finite numbers [x, y, w, h]"
    if b[2] < 0 or b[3] < 0:
        return f"bbox {b!r} has a negative width or height"
    if not _is_number(e["score"]):
        return f"score {e['score']!r} is not a finite number"
    return None


def load_detections_json(path: str | os.PathLike,
                         names: Sequence[str] | None = None) -> dict[str, Detections]:
    """Read a COCO results file into {image_id: Detections}, entries kept in file order.

    Images without detections are absent: use `result.get(i) or Detections.empty(i)`. With `names`,
    category ids (and category names, where present) are checked against them.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except IsADirectoryError as e:
        raise YoloCompressError(f"{path}: is a folder, not a detections file") from e
    except OSError as e:
        raise YoloCompressError(f"{path}: cannot read detections: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise YoloCompressError(f"{path}: not valid JSON: {e}") from e
    except RecursionError as e:   # json.load recurses once per nesting level
        raise YoloCompressError(f"{path}: JSON nested too deeply to be a detections file") from e
    if not isinstance(entries, list):
        raise YoloCompressError(f"{path}: a detections file is a JSON list, got a {type(entries).__name__}")
    grouped: dict[str, tuple[list, list, list]] = {}
    for i, e in enumerate(entries):
        problem = _entry_problem(e, names)
        if problem:
            raise YoloCompressError(f"{path}: entry {i} {problem}")
        boxes, scores, labels = grouped.setdefault(e["image_id"], ([], [], []))
        x, y, w, h = e["bbox"]
        boxes.append((x, y, x + w, y + h))
        scores.append(e["score"])
        labels.append(e["category_id"])
    return {i: Detections(i, np.array(b, np.float64), np.array(s, np.float64), np.array(c, np.int64))
            for i, (b, s, c) in grouped.items()}
