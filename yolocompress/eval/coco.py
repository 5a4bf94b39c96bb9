"""COCO box AP through pycocotools, in memory: `{"coco_map", "coco_map50", "coco_map75"}`.

COCO's own conventions apply: continuous coordinates (no +1), area = w*h, 101-point interpolated
AP, at most 100 detections per image (the highest scoring), AP averaged over IoU 0.50:0.05:0.95.

VOC 'difficult' boxes are given to pycocotools as `iscrowd=1`. That is the only way to make it
ignore a box (`COCOeval._prepare` overwrites any `ignore` key with `iscrowd`), and it keeps the VOC
rules that matter: difficult boxes do not count in recall, and detections on them are neither TP
nor FP. What differs from VOC: a detection is compared with a crowd box by intersection over the
detection's own area, and is matched to a non-difficult box first whenever one overlaps enough.
Dropping the boxes instead would turn correct detections of difficult objects into false positives.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from yolocompress.errors import YoloCompressError
from yolocompress.eval.evaluator import CollectingEvaluator, ImageEval

__all__ = ["COCOEvaluator"]


def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _coco_inputs(images: Sequence[ImageEval], class_names: Sequence[str]) -> tuple[dict, list[dict]]:
    """The ground-truth data set dict and the results list; image k gets COCO id k+1, class i category id i."""
    ds = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(class_names)]}
    results = []
    for k, im in enumerate(images, start=1):
        ds["images"].append({"id": k, "file_name": im.image_id, "width": im.width, "height": im.height})
        for box, label, difficult in zip(im.gt_boxes, im.gt_labels, im.gt_difficult):
            bbox = _xywh(box)
            # annotation ids start at 1: COCOeval treats a matched id of 0 as "unmatched"
            ds["annotations"].append({"id": len(ds["annotations"]) + 1, "image_id": k, "category_id": int(label),
                                      "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(difficult)})
        for box, score, label in zip(im.det_boxes, im.det_scores, im.det_labels):
            results.append({"image_id": k, "category_id": int(label), "bbox": _xywh(box), "score": float(score)})
    return ds, results


class COCOEvaluator(CollectingEvaluator):
    """COCO mAP@[.5:.95], AP50 and AP75 of the processed images (NaN when there is no non-difficult ground truth)."""

    def evaluate(self) -> dict[str, float]:
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError as e:
            raise YoloCompressError("COCO metrics need pycocotools (pip install pycocotools)") from e
        nan = float("nan")
        if not any((~im.gt_difficult).any() for im in self.images):
            return {"coco_map": nan, "coco_map50": nan, "coco_map75": nan}
        dataset, results = _coco_inputs(self.images, self.class_names)
        if not results:
            return {"coco_map": 0.0, "coco_map50": 0.0, "coco_map75": 0.0}
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = dataset
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # -1 marks "no ground truth" in pycocotools; cannot happen past the check above, kept as NaN anyway
        m, m50, m75 = (float(s) if s >= 0 else nan for s in ev.stats[:3])
        return {"coco_map": m, "coco_map50": m50, "coco_map75": m75}
