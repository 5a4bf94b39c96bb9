"""Evaluator interface (detectron2 style): `reset()`, `process(targets, detections)` per batch, `evaluate()`.

`targets` is a sequence of `Record` (ground truth in original-image pixels) and `detections` a parallel
sequence of `Detections` for the same images; `evaluate()` returns `{metric_name: float}`. Usage:

    ev.reset()
    for batch in loader:
        ev.process(records, model_detections)
    metrics = ev.evaluate()
"""
from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from yolocompress.data.records import Record
from yolocompress.errors import YoloCompressError
from yolocompress.eval.detections import Detections

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "CollectingEvaluator", "ImageEval"]


class DatasetEvaluator(abc.ABC):
    """Accumulates (ground truth, detections) pairs over a data set and turns them into metrics."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything processed so far (called before each evaluation pass)."""

    @abc.abstractmethod
    def process(self, targets: Sequence[Record], detections: Sequence[Detections]) -> None:
        """Take one batch: `targets[i]` is the ground truth of the image `detections[i]` was computed on."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Metrics over everything processed since the last reset."""


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run as one; `evaluate()` merges their dicts, and two that report one key is an error."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        self.evaluators = list(evaluators)

    def reset(self) -> None:
        for e in self.evaluators:
            e.reset()

    def process(self, targets: Sequence[Record], detections: Sequence[Detections]) -> None:
        for e in self.evaluators:
            e.process(targets, detections)

    def evaluate(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        owner: dict[str, str] = {}
        for e in self.evaluators:
            for k, v in e.evaluate().items():
                if k in merged:
                    raise YoloCompressError(f"metric {k!r} is reported by both {owner[k]} and "
                                            f"{type(e).__name__}")
                merged[k], owner[k] = v, type(e).__name__
        return merged


@dataclass(frozen=True)
class ImageEval:
    """One image's ground truth and detections, as kept by `CollectingEvaluator`."""
    image_id: str
    width: int
    height: int
    gt_boxes: np.ndarray      # (G, 4) float32 xyxy
    gt_labels: np.ndarray     # (G,) int64
    gt_difficult: np.ndarray  # (G,) bool
    det_boxes: np.ndarray     # (D, 4) float32 xyxy
    det_scores: np.ndarray    # (D,) float32
    det_labels: np.ndarray    # (D,) int64


class CollectingEvaluator(DatasetEvaluator):
    """Keeps every image's checked ground truth and detections in memory (`self.images`) for `evaluate()`.

    Checks: targets and detections pair up by image_id, every class index is < len(class_names), and
    no image is processed twice between resets (it would be counted twice).
    """

    def __init__(self, class_names: Sequence[str]):
        if isinstance(class_names, str) or not class_names:
            raise YoloCompressError("an evaluator needs a non-empty list of class names")
        self.class_names = list(class_names)
        self.reset()

    def reset(self) -> None:
        self.images: list[ImageEval] = []
        self._seen: set[str] = set()

    def process(self, targets: Sequence[Record], detections: Sequence[Detections]) -> None:
        if len(targets) != len(detections):
            raise YoloCompressError(f"{len(targets)} targets but {len(detections)} detections in a batch")
        nc = len(self.class_names)
        batch, batch_ids = [], set()
        for t, d in zip(targets, detections):
            if t.image_id != d.image_id:
                raise YoloCompressError(f"detections of image {d.image_id!r} were paired with the ground "
                                        f"truth of {t.image_id!r}")
            if t.image_id in self._seen or t.image_id in batch_ids:
                raise YoloCompressError(f"image {t.image_id!r} was processed twice since the last reset")
            for what, labels in (("ground truth", t.labels), ("detections", d.labels)):
                if len(labels) and (labels.min() < 0 or labels.max() >= nc):
                    bad = labels[(labels < 0) | (labels >= nc)][0]
                    raise YoloCompressError(f"{what} of image {t.image_id!r} have class index {bad} "
                                            f"but there are {nc} classes")
            batch.append(ImageEval(t.image_id, t.width, t.height, t.boxes.copy(), t.labels.copy(),
                                   t.difficult.copy(), d.boxes.copy(), d.scores.copy(), d.labels.copy()))
            batch_ids.add(t.image_id)
        self.images.extend(batch)
        self._seen |= batch_ids
