"""PASCAL VOC detection AP with the devkit's semantics: VOC2007 11-point and VOC2010+ all-point AP.

Per class, detections are pooled over images and ranked by descending score (stable: ties keep
processing order). Each is compared, by IoU with the devkit's +1 pixel widths, to every ground-truth
box of its class in its image, difficult ones included, and takes the best (first on ties). If that
IoU >= `iou_thresh`: a difficult box makes the detection ignored (neither TP nor FP), an unmatched
box makes it a TP and marks the box, a marked box makes it a FP (duplicate); below the threshold it
is a FP. Recall is over the non-difficult boxes. One corner differs from the MATLAB devkit: a class
whose every detection is ignored scores 11-point AP 0 where the devkit's 0/0 precision gives NaN
(the devkit's all-point AP is 0 there too, and py-faster-rcnn's voc_eval gives 0 for both).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from yolocompress.data.records import Record
from yolocompress.errors import YoloCompressError
from yolocompress.eval.detections import Detections
from yolocompress.eval.evaluator import CollectingEvaluator, ImageEval
from yolocompress.plotting import new_figure, save_figure

__all__ = ["voc_ap", "VOCEvaluator", "plot_pr_curves"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP of one class from its ranked PR curve (recall non-decreasing, one point per detection).

    `use_07_metric`: VOC2007 11-point AP, the mean over t = 0, 0.1, ..., 1 of the highest precision at
    recall >= t (0 where recall never reaches t). Otherwise VOC2010+ all-point AP: the area under the
    precision envelope (precision made non-increasing from the right), summed where recall changes.
    An empty curve (no detections) has AP 0.
    """
    rec = np.asarray(recall, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64)
    if rec.ndim != 1 or rec.shape != prec.shape:
        raise YoloCompressError(f"voc_ap: recall {rec.shape} and precision {prec.shape} must be 1-D of one length")
    if not (np.isfinite(rec).all() and np.isfinite(prec).all()):
        raise YoloCompressError("voc_ap: recall and precision must be finite")
    if (np.diff(rec) < 0).any():
        raise YoloCompressError("voc_ap: recall must be non-decreasing along the ranked detections")
    if use_07_metric:
        if not len(rec):
            return 0.0
        envelope = np.maximum.accumulate(prec[::-1])[::-1]   # envelope[i] = max(prec[i:])
        # t = k/10 exactly (not accumulated 0.1 steps), so a recall of exactly 7/10 counts at t = 0.7.
        first = np.searchsorted(rec, np.arange(11) / 10.0, side="left")
        reached = first < len(rec)
        return float(np.where(reached, envelope[np.minimum(first, len(rec) - 1)], 0.0).sum() / 11.0)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.maximum.accumulate(np.concatenate(([0.0], prec, [0.0]))[::-1])[::-1]
    change = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(((mrec[change] - mrec[change - 1]) * mpre[change]).sum())


def _paired_iou(a: np.ndarray, b: np.ndarray, plus_one: bool) -> np.ndarray:
    """IoU of a[i] with b[i] (float64 xyxy); 0 where they do not overlap (devkit: iw > 0 and ih > 0)."""
    one = 1.0 if plus_one else 0.0
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + one
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + one
    overlap = (iw > 0) & (ih > 0)
    inter = np.where(overlap, iw * ih, 0.0)
    union = ((a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
             + (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one) - inter)
    return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _cat(arrays: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
    return np.concatenate(arrays) if arrays else empty


def _ranked_outcomes(images: Sequence[ImageEval], num_classes: int, iou_thresh: float,
                     plus_one: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """Per class, the TP flags of its non-ignored detections in rank order; and npos per class.

    The devkit's loop is sequential, but a detection's best box does not depend on earlier
    detections, so only "is this box already matched" is order-dependent: a detection is a TP iff it
    is the first, in rank order, to pick its (non-difficult) box with IoU >= thresh. Ignored
    detections are dropped: they change neither cumulative TP nor FP, so the PR curve keeps its points.
    """
    n_img = len(images)
    gt_n = np.array([len(im.gt_labels) for im in images], dtype=np.int64)
    det_n = np.array([len(im.det_labels) for im in images], dtype=np.int64)
    gt_boxes = _cat([im.gt_boxes for im in images], np.zeros((0, 4), np.float32)).astype(np.float64)
    gt_labels = _cat([im.gt_labels for im in images], np.zeros(0, np.int64))
    gt_diff = _cat([im.gt_difficult for im in images], np.zeros(0, bool))
    det_boxes = _cat([im.det_boxes for im in images], np.zeros((0, 4), np.float32)).astype(np.float64)
    det_scores = _cat([im.det_scores for im in images], np.zeros(0, np.float32))
    det_labels = _cat([im.det_labels for im in images], np.zeros(0, np.int64))
    gt_key = np.repeat(np.arange(n_img, dtype=np.int64), gt_n) * num_classes + gt_labels
    det_key = np.repeat(np.arange(n_img, dtype=np.int64), det_n) * num_classes + det_labels

    # Rank: by class, then descending score; lexsort is stable, so ties keep pooled order.
    rank = np.lexsort((-det_scores.astype(np.float64), det_labels))
    det_boxes, det_labels, det_key = det_boxes[rank], det_labels[rank], det_key[rank]

    # Ground truth grouped by (image, class), annotation order kept inside a group (devkit tie-break).
    g_order = np.argsort(gt_key, kind="stable")
    keys, g_start, g_count = np.unique(gt_key[g_order], return_index=True, return_counts=True)
    slot = np.zeros(len(det_key), dtype=np.int64)
    n_cand = np.zeros(len(det_key), dtype=np.int64)
    if len(keys):
        slot = np.minimum(np.searchsorted(keys, det_key), len(keys) - 1)
        n_cand = np.where(keys[slot] == det_key, g_count[slot], 0)

    # Every (detection, candidate box) pair, laid out detection after detection.
    pair_det = np.repeat(np.arange(len(det_key)), n_cand)
    pair_first = np.cumsum(n_cand) - n_cand
    within = np.arange(len(pair_det)) - pair_first[pair_det]
    pair_gt = g_order[g_start[slot[pair_det]] + within]
    iou = _paired_iou(det_boxes[pair_det], gt_boxes[pair_gt], plus_one)

    best_gt = np.full(len(det_key), -1, dtype=np.int64)
    with_pairs = np.flatnonzero(n_cand > 0)
    if len(with_pairs):
        starts = pair_first[with_pairs]
        best = np.maximum.reduceat(iou, starts)
        # first pair reaching the best IoU, as the devkit's strict `ov > ovmax` scan picks
        pos = np.where(iou == np.repeat(best, n_cand[with_pairs]), within, np.iinfo(np.int64).max)
        first = np.minimum.reduceat(pos, starts)
        hit = best >= iou_thresh
        best_gt[with_pairs[hit]] = pair_gt[starts[hit] + first[hit]]

    matched = best_gt >= 0
    ignored = np.zeros(len(det_key), bool)
    ignored[matched] = gt_diff[best_gt[matched]]
    tp = np.zeros(len(det_key), bool)
    claims = np.flatnonzero(matched & ~ignored)
    _, first_claim = np.unique(best_gt[claims], return_index=True)
    tp[claims[first_claim]] = True

    bounds = np.searchsorted(det_labels, np.arange(num_classes + 1))
    per_class = [tp[lo:hi][~ignored[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:])]
    npos = np.bincount(gt_labels[~gt_diff], minlength=num_classes)
    return per_class, npos


class VOCEvaluator(CollectingEvaluator):
    """VOC mAP at one IoU threshold: `{"map50_voc07", "map50_all"}` (11-point and all-point) for 0.5.

    A class with no non-difficult ground truth has AP NaN (the devkit divides by npos = 0 too) and is
    left out of the mean; a class with ground truth but no detections has AP 0. `plus_one=False`
    drops the devkit's +1 pixel convention (continuous coordinates, as COCO).
    """

    def __init__(self, class_names: Sequence[str], iou_thresh: float = 0.5, plus_one: bool = True):
        if not 0.0 < iou_thresh <= 1.0:
            raise YoloCompressError(f"VOC evaluator: iou_thresh must be in (0, 1], got {iou_thresh}")
        self.iou_thresh = float(iou_thresh)
        self.plus_one = bool(plus_one)
        self._tag = f"map{self.iou_thresh * 100:g}"
        super().__init__(class_names)

    def reset(self) -> None:
        super().reset()
        self._result: tuple[dict, dict, dict] | None = None

    def process(self, targets: Sequence[Record], detections: Sequence[Detections]) -> None:
        super().process(targets, detections)
        self._result = None

    def _compute(self) -> tuple[dict, dict, dict]:
        if self._result is None:
            per_class, npos = _ranked_outcomes(self.images, len(self.class_names), self.iou_thresh, self.plus_one)
            ap07, apall, curves = {}, {}, {}
            for name, tp, n in zip(self.class_names, per_class, npos):
                if n == 0:
                    ap07[name] = apall[name] = float("nan")
                    continue
                ctp = np.cumsum(tp, dtype=np.float64)
                recall = ctp / n
                precision = ctp / np.arange(1, len(tp) + 1)   # tp + fp: every kept detection is one or the other
                ap07[name] = voc_ap(recall, precision, use_07_metric=True)
                apall[name] = voc_ap(recall, precision, use_07_metric=False)
                curves[name] = (recall, precision)
            self._result = (ap07, apall, curves)
        return self._result

    def evaluate(self) -> dict[str, float]:
        ap07, apall, _ = self._compute()
        return {f"{self._tag}_voc07": _nan_mean(ap07.values()), f"{self._tag}_all": _nan_mean(apall.values())}

    def per_class(self) -> dict[str, dict[str, float]]:
        """Per-class AP: `{"voc07": {name: ap}, "all": {name: ap}}`, NaN for classes without ground truth."""
        ap07, apall, _ = self._compute()
        return {"voc07": dict(ap07), "all": dict(apall)}

    def pr_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """`{name: (recall, precision)}` along the ranked detections; classes without ground truth are absent."""
        return dict(self._compute()[2])


def _nan_mean(values) -> float:
    v = np.array(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def plot_pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                   title: str = "Precision-recall") -> None:
    """Plot one PR curve per class (legend with its all-point AP) to `path`; format from the suffix, written atomically."""
    fig = new_figure(8, 6, constrained=False)
    ax = fig.add_subplot()
    for name, (rec, prec) in curves.items():
        ap = voc_ap(rec, prec, use_07_metric=False)
        ax.plot(rec, prec, label=f"{name} (AP {ap:.3f})", linewidth=1.2)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    save_figure(fig, path, dpi=120, bbox_inches="tight")
