"""VOC AP: hand-computed cases for 11-point and all-point AP, and agreement with a plain devkit-style loop."""
from __future__ import annotations

import math

import numpy as np
import pytest

from yolocompress.data.records import Record, pairwise_iou
from yolocompress.errors import YoloCompressError
from yolocompress.eval.detections import Detections
from yolocompress.eval.voc import VOCEvaluator, _paired_iou, plot_pr_curves, voc_ap

FAR = [200, 200, 209, 209]   # a box that overlaps none of the ground truth below


def rec(image_id, boxes, labels=None, difficult=None, size=(500, 400)):
    labels = [0] * len(boxes) if labels is None else labels
    return Record(f"/data/{image_id}.jpg", size[0], size[1], np.array(boxes, np.float32).reshape(-1, 4),
                  labels, difficult)


def det(image_id, boxes, scores, labels=None):
    labels = [0] * len(boxes) if labels is None else labels
    return Detections(image_id, np.array(boxes, np.float32).reshape(-1, 4), scores, labels)


def run(pairs, names=("a",), **kw) -> VOCEvaluator:
    ev = VOCEvaluator(list(names), **kw)
    ev.process([p[0] for p in pairs], [p[1] for p in pairs])
    return ev


def ap_of(ev, cls="a"):
    pc = ev.per_class()
    return pc["voc07"][cls], pc["all"][cls]


G1, G2, G3 = [0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9]


def test_tp_fp_sequence_hand_computed():
    # Ranked: TP FP TP FP TP over 3 GT -> recall 1/3 1/3 2/3 2/3 1, precision 1 1/2 2/3 1/2 3/5.
    # all-point: envelope 1, 2/3, 3/5 over recall steps of 1/3 -> (1 + 2/3 + 3/5)/3 = 34/45.
    # 11-point: t=0..0.3 -> 1 (4 points), t=0.4..0.6 -> 2/3 (3), t=0.7..1 -> 3/5 (4) -> (4 + 2 + 2.4)/11.
    ev = run([(rec("i", [G1, G2, G3]), det("i", [G1, FAR, G2, FAR, G3], [.9, .8, .7, .6, .5]))])
    ap07, apall = ap_of(ev)
    assert apall == pytest.approx(34 / 45, abs=1e-12)
    assert ap07 == pytest.approx(8.4 / 11, abs=1e-12)
    assert ev.evaluate() == pytest.approx({"map50_voc07": 8.4 / 11, "map50_all": 34 / 45}, abs=1e-12)
    r, p = ev.pr_curves()["a"]
    np.testing.assert_allclose(r, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(p, [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])


def test_detection_on_difficult_box_is_neither_tp_nor_fp():
    # G1 normal, G2 difficult. Ranked: on G2 (ignored), on G1 (TP), on G2 again (ignored), FAR (FP).
    # Kept: TP, FP -> recall 1, 1; precision 1, 1/2 -> both APs 1 (npos = 1). Had the detections on
    # the difficult box counted as FPs, precision at the TP would be 1/2 and AP 1/2.
    ev = run([(rec("i", [G1, G2], difficult=[False, True]), det("i", [G2, G1, G2, FAR], [.9, .8, .7, .6]))])
    assert ap_of(ev) == (1.0, 1.0)
    r, p = ev.pr_curves()["a"]
    np.testing.assert_array_equal(r, [1, 1])
    np.testing.assert_array_equal(p, [1, 0.5])


def test_only_ignored_detections_score_zero():
    # npos 1 (G1), the only detection is on the difficult G2: no TP or FP at all -> AP 0 (not NaN).
    ev = run([(rec("i", [G1, G2], difficult=[False, True]), det("i", [G2], [.9]))])
    assert ap_of(ev) == (0.0, 0.0)


def test_duplicates_are_false_positives_first_in_score_order_wins():
    # Detections: .9 on G1 with IoU 0.6, .8 exactly on G1 (IoU 1, but second: duplicate FP), .7 on G2 TP.
    # recall .5 .5 1, precision 1 1/2 2/3 -> all-point .5*1 + .5*2/3 = 5/6;
    # 11-point: t=0..0.5 -> 1 (6 points), t=0.6..1 -> 2/3 (5 points) -> (6 + 10/3)/11 = 28/33.
    loose = [0, 0, 9, 15]   # (10*10) / (10*16) = 0.625 with G1
    ev = run([(rec("i", [G1, G2]), det("i", [loose, G1, G2], [.9, .8, .7]))])
    ap07, apall = ap_of(ev)
    assert apall == pytest.approx(5 / 6, abs=1e-12)
    assert ap07 == pytest.approx(28 / 33, abs=1e-12)


def test_best_box_taken_even_if_already_matched():
    # Devkit: a detection takes its best-IoU box; if that is matched it is a FP, it does not fall back
    # to a second box above threshold. Boxes A=[0,0,9,9], B=[0,0,9,13]; detection D=[0,0,9,11]:
    # IoU(D,A) = 100/120, IoU(D,B) = 120/140 -> best is B. First detection exactly B (TP), then D -> FP.
    a, b, d = [0, 0, 9, 9], [0, 0, 9, 13], [0, 0, 9, 11]
    ev = run([(rec("i", [a, b]), det("i", [b, d], [.9, .8]))])
    np.testing.assert_array_equal(ev.pr_curves()["a"][0], [.5, .5])


@pytest.mark.parametrize("difficult_first", [True, False])
def test_equal_iou_tie_goes_to_first_box_in_annotation_order(difficult_first):
    # Two identical boxes (one difficult), detection on them: IoU 1 with both. The devkit's strict
    # `ov > ovmax` keeps the first: difficult first -> ignored, npos 1, AP 0; normal first -> TP, AP 1.
    flags = [True, False] if difficult_first else [False, True]
    ev = run([(rec("i", [G1, G1], difficult=flags), det("i", [G1], [.9]))])
    assert ap_of(ev) == ((0.0, 0.0) if difficult_first else (1.0, 1.0))


@pytest.mark.parametrize("plus_one, box, tp", [
    (True, [0, 0, 19, 9], True),    # +1: inter 10*10, union 20*10 -> IoU exactly 0.5 -> TP (>=)
    (True, [0, 0, 20, 9], False),   # +1: 100 / (21*10) = 0.476 -> FP
    (False, [0, 0, 19, 9], False),  # no +1: 9*9 / (19*9) = 0.474 -> FP
    (False, [0, 0, 18, 9], True),   # no +1: 81 / (18*9) = 0.5 exactly -> TP
])
def test_iou_threshold_edge_with_plus_one(plus_one, box, tp):
    ev = run([(rec("i", [G1]), det("i", [box], [.9]))], plus_one=plus_one)
    assert ap_of(ev) == ((1.0, 1.0) if tp else (0.0, 0.0))


def test_paired_iou_matches_pairwise_iou_diagonal():
    rng = np.random.default_rng(3)
    a = np.sort(rng.integers(0, 50, (200, 2, 2)), axis=1).transpose(0, 2, 1).reshape(-1, 4).astype(np.float64)
    b = np.sort(rng.integers(0, 50, (200, 2, 2)), axis=1).transpose(0, 2, 1).reshape(-1, 4).astype(np.float64)
    for plus_one in (True, False):
        np.testing.assert_allclose(_paired_iou(a, b, plus_one), np.diag(pairwise_iou(a, b, plus_one)), atol=1e-12)


def test_detections_pooled_over_images():
    # Image x: FP at .9 and TP at .7; image y: TP at .8. Pooled ranking FP, TP, TP over npos 2:
    # recall 0 .5 1, precision 0 1/2 2/3 -> envelope 2/3 everywhere -> both APs 2/3
    # (the mean of the per-image APs would be (1/2 + 1)/2 = 3/4).
    ev = run([(rec("x", [G1]), det("x", [FAR, G1], [.9, .7])), (rec("y", [G1]), det("y", [G1], [.8]))])
    assert ap_of(ev) == pytest.approx((2 / 3, 2 / 3), abs=1e-12)


def test_score_ties_keep_processing_order():
    # Equal scores: the FP (image x) is ranked before the TP (image y) because x was processed first:
    # recall 0, 1; precision 0, 1/2 -> AP 1/2. Processing y first ranks the TP first -> AP 1.
    x = (rec("x", [], []), det("x", [G1], [.5]))
    y = (rec("y", [G1]), det("y", [G1], [.5]))
    assert ap_of(run([x, y]))[1] == 0.5
    assert ap_of(run([y, x]))[1] == 1.0


def test_missing_detections_give_zero_and_missing_ground_truth_is_excluded():
    # class a found perfectly (AP 1), class b has ground truth but no detections (AP 0), class c has
    # detections but no ground truth (NaN) and class d only a difficult box (NaN): mean over a, b = 1/2.
    r = rec("i", [G1, G2, G3], labels=[0, 1, 3], difficult=[False, False, True])
    d = det("i", [G1, G2], [.9, .8], labels=[0, 2])
    ev = run([(r, d)], names=("a", "b", "c", "d"))
    pc = ev.per_class()
    assert pc["all"]["a"] == pc["voc07"]["a"] == 1.0
    assert pc["all"]["b"] == pc["voc07"]["b"] == 0.0
    assert all(math.isnan(pc[m][c]) for m in ("all", "voc07") for c in ("c", "d"))
    assert ev.evaluate() == {"map50_voc07": 0.5, "map50_all": 0.5}
    assert set(ev.pr_curves()) == {"a", "b"}


def test_no_ground_truth_at_all_is_nan():
    out = run([(rec("i", []), det("i", [G1], [.9]))]).evaluate()
    assert math.isnan(out["map50_voc07"]) and math.isnan(out["map50_all"])


def test_voc_ap_direct():
    # 11-point thresholds are k/10 exactly: a recall of exactly 7/10 reaches t = 0.7 (8 points of 11).
    assert voc_ap(np.array([7 / 10]), np.array([1.0]), use_07_metric=True) == pytest.approx(8 / 11, abs=1e-15)
    assert voc_ap(np.array([7 / 10]), np.array([1.0]), use_07_metric=False) == pytest.approx(0.7, abs=1e-15)
    assert voc_ap(np.zeros(0), np.zeros(0), True) == voc_ap(np.zeros(0), np.zeros(0), False) == 0.0
    with pytest.raises(YoloCompressError, match="non-decreasing"):
        voc_ap(np.array([.5, .2]), np.array([1., 1.]), False)
    with pytest.raises(YoloCompressError, match="one length"):
        voc_ap(np.array([.5]), np.array([1., 1.]), True)


def test_other_iou_threshold_names_the_metric():
    # IoU of [0,0,14,9] with G1 under +1 is 100/150 = 0.667: TP at 0.5, FP at 0.75.
    pair = (rec("i", [G1]), det("i", [[0, 0, 14, 9]], [.9]))
    assert run([pair], iou_thresh=0.75).evaluate() == {"map75_voc07": 0.0, "map75_all": 0.0}
    assert run([pair]).evaluate() == {"map50_voc07": 1.0, "map50_all": 1.0}
    with pytest.raises(YoloCompressError, match="iou_thresh"):
        VOCEvaluator(["a"], iou_thresh=0.0)


def test_bad_batches_are_errors():
    ev = VOCEvaluator(["a", "b"])
    with pytest.raises(YoloCompressError, match="paired"):
        ev.process([rec("x", [G1])], [det("y", [G1], [.9])])
    with pytest.raises(YoloCompressError, match="1 targets but 0"):
        ev.process([rec("x", [G1])], [])
    with pytest.raises(YoloCompressError, match="class index 2"):
        ev.process([rec("x", [G1])], [det("x", [G1], [.9], labels=[2])])
    with pytest.raises(YoloCompressError, match="class index 5"):
        ev.process([rec("x", [G1], labels=[5])], [det("x", [], [])])
    ev.process([rec("x", [G1])], [det("x", [G1], [.9])])
    with pytest.raises(YoloCompressError, match="twice"):
        ev.process([rec("x", [G1])], [det("x", [G1], [.9])])
    ev.reset()
    ev.process([rec("x", [G1])], [det("x", [], [])])
    assert ev.evaluate()["map50_all"] == 0.0


def test_results_follow_process_and_reset():
    ev = VOCEvaluator(["a"])
    ev.process([rec("x", [G1])], [det("x", [G1], [.9])])
    assert ev.evaluate()["map50_all"] == 1.0
    ev.process([rec("y", [G1])], [det("y", [], [])])    # a second image, missed: recall 1/2
    assert ev.evaluate()["map50_all"] == 0.5
    ev.reset()
    assert math.isnan(ev.evaluate()["map50_all"])


def test_plot_pr_curves_writes_png_atomically(tmp_path):
    ev = run([(rec("i", [G1, G2, G3]), det("i", [G1, FAR, G2], [.9, .8, .7]))])
    out = tmp_path / "pr.png"
    plot_pr_curves(ev.pr_curves(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pr.png"]
    with pytest.raises(YoloCompressError, match="suffix"):
        plot_pr_curves(ev.pr_curves(), tmp_path / "pr")


# ---- independent reference: a line-by-line transcription of the devkit's VOCevaldet.m / VOCap.m loops ----

def _reference_class_ap(records, dets, cls, thr=0.5, plus_one=True):
    one = 1.0 if plus_one else 0.0
    gt = {r.image_id: ([b for b, l in zip(r.boxes.tolist(), r.labels) if l == cls],
                       [d for d, l in zip(r.difficult, r.labels) if l == cls]) for r in records}
    npos = sum(not d for _, diffs in gt.values() for d in diffs)
    pooled = [(d.image_id, s, b) for d in dets for b, s, l in zip(d.boxes.tolist(), d.scores.tolist(), d.labels)
              if l == cls]
    pooled.sort(key=lambda x: -x[1])            # Python's sort is stable, like MATLAB's sort
    used = {i: [False] * len(g[0]) for i, g in gt.items()}
    tp, fp = [], []
    for image_id, _, bb in pooled:
        ovmax, jmax = -math.inf, -1
        for j, g in enumerate(gt[image_id][0]):
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + one
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + one
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + one) * (bb[3] - bb[1] + one) + (g[2] - g[0] + one) * (g[3] - g[1] + one) - iw * ih
                if iw * ih / ua > ovmax:
                    ovmax, jmax = iw * ih / ua, j
        t = f = 0
        if ovmax >= thr:
            if not gt[image_id][1][jmax]:
                if not used[image_id][jmax]:
                    t, used[image_id][jmax] = 1, True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    if npos == 0:
        return math.nan, math.nan
    ctp, cfp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
    recall = ctp / npos
    with np.errstate(invalid="ignore"):
        prec = ctp / (ctp + cfp)                # NaN where only ignored detections so far, as in MATLAB
    ap07 = 0.0
    for k in range(11):
        sel = prec[recall >= k / 10]
        sel = sel[~np.isnan(sel)]               # MATLAB's max skips NaN
        ap07 += (sel.max() if len(sel) else 0.0) / 11
    mrec = [0.0, *recall, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = mpre[i + 1] if math.isnan(mpre[i]) else max(mpre[i], mpre[i + 1])
    apall = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
    return ap07, apall


def _random_set(rng, n_img, n_cls):
    """Integer boxes on a small grid (IoU ties, exact-threshold cases), coarse scores (score ties), 25 % difficult."""
    records, dets = [], []
    for i in range(n_img):
        g = int(rng.integers(0, 6))
        xy = rng.integers(0, 30, (g, 2))
        gb = np.concatenate([xy, xy + rng.integers(2, 15, (g, 2))], 1)
        gl = rng.integers(0, n_cls, g)
        if g >= 2 and rng.random() < 0.3:      # a duplicated annotation: exercises the equal-IoU tie-break
            gb[1], gl[1] = gb[0], gl[0]
        records.append(Record(f"/d/{i}.jpg", 64, 64, gb, gl, rng.random(g) < 0.25))
        k = int(rng.integers(0, 12))
        src = rng.integers(0, max(g, 1), k)
        near = gb[src] + rng.integers(-1, 2, (k, 4)) if g else np.zeros((k, 4))
        xy = rng.integers(0, 30, (k, 2))
        rand = np.concatenate([xy, xy + rng.integers(0, 15, (k, 2))], 1)
        is_near = rng.random(k) < 0.7
        b = np.where(is_near[:, None], near, rand).astype(np.float64)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])
        labels = rng.integers(0, n_cls, k)
        if g:
            labels = np.where(is_near & (rng.random(k) < 0.8), gl[src], labels)
        dets.append(Detections(str(i), b, rng.integers(0, 8, k) / 8, labels))
    return records, dets


@pytest.mark.parametrize("seed", range(150))
def test_matches_reference_loop_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n_cls = 3
    records, dets = _random_set(rng, int(rng.integers(1, 25)), n_cls)
    plus_one, thr = bool(seed % 2), (0.5, 0.3, 0.7)[seed % 3]
    ev = VOCEvaluator([f"c{c}" for c in range(n_cls)], iou_thresh=thr, plus_one=plus_one)
    for lo in range(0, len(records), 4):
        ev.process(records[lo:lo + 4], dets[lo:lo + 4])
    pc = ev.per_class()
    for c in range(n_cls):
        want07, wantall = _reference_class_ap(records, dets, c, thr, plus_one)
        np.testing.assert_allclose([pc["voc07"][f"c{c}"], pc["all"][f"c{c}"]], [want07, wantall],
                                   rtol=0, atol=1e-12, err_msg=f"class {c}")
