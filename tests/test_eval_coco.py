"""COCO metrics against pycocotools run the standard way, VOC vs COCO AP50, evaluator combination, results JSON."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yolocompress.data.records import Record
from yolocompress.errors import YoloCompressError
from yolocompress.eval.coco import COCOEvaluator
from yolocompress.eval.detections import Detections, load_detections_json, save_detections_json
from yolocompress.eval.evaluator import DatasetEvaluators
from yolocompress.eval.voc import VOCEvaluator

NAMES = ["cat", "dog", "bird"]


def random_set(rng, n_img, n_cls, p_difficult):
    """Continuous boxes; most detections are jittered ground truth, some random; up to 30 per image."""
    records, dets = [], []
    for i in range(n_img):
        g = int(rng.integers(0, 6))
        xy = rng.uniform(0, 300, (g, 2))
        gb = np.concatenate([xy, xy + rng.uniform(5, 150, (g, 2))], 1)
        gl = rng.integers(0, n_cls, g)
        records.append(Record(f"/d/im{i}.jpg", 480, 360, gb, gl, rng.random(g) < p_difficult))
        k = int(rng.integers(0, 30))
        src = rng.integers(0, max(g, 1), k)
        near = gb[src] + rng.normal(0, 6, (k, 4)) if g else np.zeros((k, 4))
        xy = rng.uniform(0, 300, (k, 2))
        rand = np.concatenate([xy, xy + rng.uniform(5, 150, (k, 2))], 1)
        is_near = rng.random(k) < 0.75
        b = np.where(is_near[:, None], near, rand)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        labels = np.where(is_near & (rng.random(k) < 0.85), gl[src], rng.integers(0, n_cls, k)) if g else \
            rng.integers(0, n_cls, k)
        dets.append(Detections(f"im{i}", b, rng.random(k), labels))
    return records, dets


def pycocotools_direct(tmp_path, records, dets, names):
    """The standard pycocotools recipe: GT json file -> COCO, results json file -> loadRes -> COCOeval."""
    ids = {r.image_id: k + 1 for k, r in enumerate(records)}
    anns = []
    for r in records:
        for (x1, y1, x2, y2), c, d in zip(r.boxes.tolist(), r.labels.tolist(), r.difficult.tolist()):
            anns.append({"id": len(anns) + 1, "image_id": ids[r.image_id], "category_id": c,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(d)})
    gt_file, res_file = tmp_path / "gt.json", tmp_path / "res.json"
    gt_file.write_text(json.dumps({
        "images": [{"id": ids[r.image_id], "width": r.width, "height": r.height} for r in records],
        "annotations": anns, "categories": [{"id": i, "name": n} for i, n in enumerate(names)]}))
    res_file.write_text(json.dumps([
        {"image_id": ids[d.image_id], "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
        for d in dets for (x1, y1, x2, y2), s, c in zip(d.boxes.tolist(), d.scores, d.labels)]))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(str(res_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


def evaluate(evaluator, records, dets, batch=5):
    evaluator.reset()
    for lo in range(0, len(records), batch):
        evaluator.process(records[lo:lo + batch], dets[lo:lo + batch])
    return evaluator.evaluate()


@pytest.mark.parametrize("seed", range(6))
def test_coco_matches_pycocotools_run_directly(tmp_path, seed):
    rng = np.random.default_rng(seed)
    records, dets = random_set(rng, 25, len(NAMES), p_difficult=0.2 if seed % 2 else 0.0)
    got = evaluate(COCOEvaluator(NAMES), records, dets)
    want = pycocotools_direct(tmp_path, records, dets, NAMES)
    assert 0.05 < want[1] < 0.95          # a non-trivial case
    np.testing.assert_allclose([got["coco_map"], got["coco_map50"], got["coco_map75"]], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_voc_all_point_agrees_with_coco_ap50_when_tps_rank_first(seed):
    # One class, k of n boxes found exactly, ranked above all false positives: the PR curve is
    # precision 1 up to recall r = k/n, then falls. All-point AP (no +1, same >= 0.5 rule) is exactly r;
    # COCO's 101-point AP samples that step at recall 0, .01, ..., 1 and gives (#thresholds <= r)/101,
    # i.e. (floor(100 r) + 1)/101, within 1/101 of r and equal to it at r = 1. Hence the tolerance.
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 30))
    k = n if seed == 0 else int(rng.integers(1, n + 1))
    records, dets = [], []
    for i in range(n):          # one box per image so that COCO's 100-detections-per-image cap never bites
        xy = rng.uniform(0, 200, 2)
        gt = np.concatenate([xy, xy + rng.uniform(10, 100, 2)])[None]
        found = i < k
        boxes = np.concatenate([gt if found else np.zeros((0, 4)), gt + 500])    # +500: far off, a FP
        scores = np.concatenate([[1.0 + rng.random()] if found else [], [rng.random()]])
        records.append(Record(f"/d/{i}.jpg", 1000, 1000, gt, [0]))
        dets.append(Detections(str(i), boxes, scores, np.zeros(len(boxes), np.int64)))
    voc = evaluate(VOCEvaluator(["a"], plus_one=False), records, dets)["map50_all"]
    coco = evaluate(COCOEvaluator(["a"]), records, dets)["coco_map50"]
    assert voc == pytest.approx(k / n, abs=1e-12)
    assert abs(voc - coco) <= 1 / 101 + 1e-12
    if k == n:
        assert coco == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("on_difficult", [True, False])
def test_difficult_boxes_are_ignored_by_coco_too(on_difficult):
    # GT A normal, B difficult (crowd); A is detected (.8), B (.9) only when on_difficult. Ignoring B
    # gives AP 1 at every IoU either way. Dropping B would make its detection a FP ranked first (AP
    # about 1/2); counting B as a normal box would cap recall at 1/2 when it is missed (AP about 1/2).
    a, b = [0, 0, 40, 40], [100, 100, 140, 140]
    r = Record("/d/x.jpg", 200, 200, [a, b], [0, 0], [False, True])
    d = Detections("x", [b, a], [.9, .8], [0, 0]) if on_difficult else Detections("x", [a], [.8], [0])
    out = evaluate(COCOEvaluator(["a"]), [r], [d])
    assert out == pytest.approx({"coco_map": 1.0, "coco_map50": 1.0, "coco_map75": 1.0}, abs=1e-12)


def test_no_detections_is_zero_and_no_ground_truth_is_nan(capsys):
    r = Record("/d/x.jpg", 200, 200, [[0, 0, 40, 40]], [1])
    assert evaluate(COCOEvaluator(NAMES), [r], [Detections.empty("x")]) == \
        {"coco_map": 0.0, "coco_map50": 0.0, "coco_map75": 0.0}
    empty = Record("/d/y.jpg", 200, 200)
    out = evaluate(COCOEvaluator(NAMES), [empty], [Detections("y", [[0, 0, 9, 9]], [.5], [0])])
    assert all(math.isnan(v) for v in out.values())
    evaluate(COCOEvaluator(NAMES), [r], [Detections("x", [[0, 0, 40, 40]], [.5], [1])])
    assert capsys.readouterr().out == ""     # pycocotools' prints are swallowed


def test_evaluators_combine_and_clash():
    rng = np.random.default_rng(7)
    records, dets = random_set(rng, 12, len(NAMES), 0.1)
    both = evaluate(DatasetEvaluators([VOCEvaluator(NAMES), COCOEvaluator(NAMES)]), records, dets)
    alone = {**evaluate(VOCEvaluator(NAMES), records, dets), **evaluate(COCOEvaluator(NAMES), records, dets)}
    assert both == alone and set(both) == {"map50_voc07", "map50_all", "coco_map", "coco_map50", "coco_map75"}
    clash = DatasetEvaluators([VOCEvaluator(NAMES), VOCEvaluator(NAMES, plus_one=False)])
    with pytest.raises(YoloCompressError, match="'map50_voc07' is reported by both VOCEvaluator and VOCEvaluator"):
        evaluate(clash, records, dets)
    # a different IoU threshold names different metrics, so no clash
    assert set(evaluate(DatasetEvaluators([VOCEvaluator(NAMES), VOCEvaluator(NAMES, iou_thresh=0.75)]),
                        records, dets)) == {"map50_voc07", "map50_all", "map75_voc07", "map75_all"}


# ---- Detections and the results file ----

def test_detections_check_themselves():
    d = Detections("a", [[1, 2, 3, 4]], [0.5], [2])
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32 and d.labels.dtype == np.int64
    assert len(Detections.empty("a")) == 0
    bad = [(dict(image_id=""), "non-empty string"),
           (dict(boxes=[[1, 2, 3, 4]], scores=[.5, .6], labels=[0]), "1 boxes but 2 scores"),
           (dict(boxes=[[3, 2, 1, 4]], scores=[.5], labels=[0]), "x2 >= x1"),
           (dict(boxes=[[1, 2, 3, np.nan]], scores=[.5], labels=[0]), "finite"),
           (dict(boxes=[[1, 2, 3, 4]], scores=[.5], labels=[-1]), "negative class index"),
           (dict(boxes=[[1, 2, 3, 4]], scores=[.5], labels=[0.5]), "integers")]
    for kw, msg in bad:
        with pytest.raises(YoloCompressError, match=msg):
            Detections(**{"image_id": "a", **kw})


def test_results_json_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    _, dets = random_set(rng, 10, len(NAMES), 0.0)
    dets = [d for d in dets if len(d)]
    path = tmp_path / "dets.json"
    path.write_text("old")
    save_detections_json(path, dets, names=NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dets.json"]     # replaced, no temp file left
    entries = json.loads(path.read_text())
    assert entries[0].keys() == {"image_id", "category_id", "bbox", "score", "category_name"}
    assert entries[0]["category_name"] == NAMES[entries[0]["category_id"]]
    loaded = load_detections_json(path, names=NAMES)
    assert list(loaded) == [d.image_id for d in dets]
    for d in dets:
        got = loaded[d.image_id]
        np.testing.assert_array_equal(got.boxes, d.boxes)
        np.testing.assert_array_equal(got.scores, d.scores)
        np.testing.assert_array_equal(got.labels, d.labels)
    with pytest.raises(YoloCompressError, match="class index 2 but there are 2 class names"):
        save_detections_json(path, [Detections("a", [[0, 0, 1, 1]], [.5], [2])], names=["x", "y"])


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"image_id": "a"}', "is a JSON list, got a dict"),
    ('[3]', "entry 0 is a int, not an object"),
    ('[{"image_id": "a", "bbox": [0, 0, 1, 1], "score": 1}]', "entry 0 lacks category_id"),
    ('[{"image_id": 7, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 1}]', "image_id 7 is not"),
    ('[{"image_id": "a", "category_id": -1, "bbox": [0, 0, 1, 1], "score": 1}]', "category_id -1 is not"),
    ('[{"image_id": "a", "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}]', "out of range for 3 classes"),
    ('[{"image_id": "a", "category_id": 0, "category_name": "dog", "bbox": [0, 0, 1, 1], "score": 1}]',
     "category_name 'dog' is not class 0"),
    ('[{"image_id": "a", "category_id": 0, "bbox": [0, 0, 1], "score": 1}]', "not 4 finite numbers"),
    ('[{"image_id": "a", "category_id": 0, "bbox": [0, 0, -1, 1], "score": 1}]', "negative width"),
    ('[{"image_id": "a", "category_id": 0, "bbox": [0, 0, 1, 1], "score": "high"}]', "score 'high' is not"),
])
def test_malformed_results_file_is_a_one_line_error(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(YoloCompressError) as err:
        load_detections_json(path, names=NAMES)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg


def test_missing_results_file(tmp_path):
    with pytest.raises(YoloCompressError, match="cannot read detections"):
        load_detections_json(tmp_path / "none.json")
