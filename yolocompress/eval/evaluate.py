"""Model + records -> metrics: the evaluation loop every stage and `yolocompress eval` share.

Metric names say what they are: `voc07` -> map50_voc07 (11-point), `voc12` -> map50_all
(all-point), `coco` -> coco_map (AP@[.5:.95]) and coco_map50. The VOC evaluator always runs, so
both VOC numbers are reported whatever the headline metric is.

`evaluate_model(model, records, evaluator)` is the one model-scoring call: `ModelEvaluator` holds
the inference and scoring settings, built once (`ModelEvaluator.from_config` for a stage, or from
the `eval` command's flags).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.dataset import DetectionDataset, build_loader
from ..data.records import Record
from ..errors import YoloCompressError
from ..inference import detect_batch
from ..models.darknet import Darknet
from .coco import COCOEvaluator
from .detections import Detections
from .evaluator import DatasetEvaluator, DatasetEvaluators
from .voc import VOCEvaluator, plot_pr_curves

__all__ = ["METRIC_KEYS", "ModelEvaluator", "evaluate_model", "evaluate_detections", "run_evaluators"]

# headline metric -> the key of its number in the results
METRIC_KEYS = {"voc07": "map50_voc07", "voc12": "map50_all", "coco": "coco_map"}


def _evaluators(names: Sequence[str], metric: str) -> tuple[VOCEvaluator, DatasetEvaluator]:
    if metric not in METRIC_KEYS:
        raise YoloCompressError(f"unknown metric '{metric}' (one of {', '.join(METRIC_KEYS)})")
    # readers give edge-to-edge boxes (VOC xmin-1, ymin-1, xmax, ymax), so plain IoU here equals the
    # devkit's +1 IoU on the raw XML numbers
    voc = VOCEvaluator(names, plus_one=False)
    both = DatasetEvaluators([voc, COCOEvaluator(names)]) if metric == "coco" else voc
    return voc, both


def _results(voc: VOCEvaluator, evaluator: DatasetEvaluator, metric: str,
             plots_dir: str | Path | None) -> dict:
    metrics = evaluator.evaluate()
    per_class = voc.per_class()
    if plots_dir is not None:
        plot_pr_curves(voc.pr_curves(), Path(plots_dir) / "pr_curves.png")
    return {"metric": metric, "map": metrics[METRIC_KEYS[metric]], **metrics,
            "per_class": per_class["all" if metric == "voc12" else "voc07"]}


def run_evaluators(records: Sequence[Record], detections: Sequence[Detections],
                   names: Sequence[str], metric: str = "voc07",
                   plots_dir: str | Path | None = None) -> dict:
    """Score detections (one per record, same order) -> {"metric", "map", <metric keys>, "per_class"}."""
    voc, evaluator = _evaluators(names, metric)
    evaluator.reset()
    evaluator.process(list(records), list(detections))
    return _results(voc, evaluator, metric, plots_dir)


def evaluate_detections(records: Sequence[Record], by_image: dict[str, Detections],
                        names: Sequence[str], metric: str = "voc07",
                        plots_dir: str | Path | None = None) -> dict:
    """Score detections made elsewhere (keyed by image_id; images without any count as empty)."""
    known = {r.image_id for r in records}
    stray = sorted(set(by_image) - known)
    if stray:
        raise YoloCompressError(f"detections name {len(stray)} images that are not in the split, "
                                f"e.g. '{stray[0]}'")
    dets = [by_image.get(r.image_id) or Detections.empty(r.image_id) for r in records]
    return run_evaluators(records, dets, names, metric, plots_dir)


@dataclass(frozen=True)
class ModelEvaluator:
    """How a model is run over a split (input size, letterbox, batching, NMS) and scored (metric)."""
    names: tuple[str, ...]
    img_size: int
    letterbox: bool = False
    metric: str = "voc07"
    batch_size: int = 16
    workers: int = 0
    conf_thresh: float = 0.005
    iou_thresh: float = 0.45
    max_det: int = 300

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if self.metric not in METRIC_KEYS:
            raise YoloCompressError(f"unknown metric '{self.metric}' (one of "
                                    f"{', '.join(METRIC_KEYS)})")

    @classmethod
    def from_config(cls, config: Any, names: Sequence[str], letterbox: bool) -> ModelEvaluator:
        """The experiment's `eval` section at `model.img_size` (data.workers loader processes)."""
        ev = config.eval
        return cls(tuple(names), config.model.img_size, letterbox, ev.metric, ev.batch_size,
                   config.data.workers, ev.conf_thresh, ev.nms_iou, ev.max_det)


@torch.no_grad()
def evaluate_model(model: Darknet, records: Sequence[Record], evaluator: ModelEvaluator,
                   plots_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run `model` over `records` (no augmentation) and score it; the model is left in eval mode."""
    if not records:
        raise YoloCompressError("the evaluation split has no images")
    e = evaluator
    voc, scorer = _evaluators(e.names, e.metric)
    scorer.reset()
    dataset = DetectionDataset(records, e.img_size, augment=None, letterbox=e.letterbox,
                               drop_difficult=False)
    loader = build_loader(dataset, e.batch_size, shuffle=False, workers=e.workers, seed=0)
    model.eval()
    for images, _, metas in tqdm(loader, desc="eval", unit="batch", leave=False,
                                 disable=None if progress else True):
        dets = detect_batch(model, images, metas, e.conf_thresh, e.iou_thresh, e.max_det)
        scorer.process([records[m["index"]] for m in metas], dets)
    return _results(voc, scorer, e.metric, plots_dir)
