"""Time the VOC and COCO metrics on synthetic detections (default: 5 000 images, 20 per image, 20 classes).

Prints a markdown table; `--write` puts it, with the command line and the machine, in the
`## Evaluation speed` section of docs/BENCHMARKS.md (replacing an earlier one). Target: VOC < 2 s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


from yolocompress.benchmarks import machine, run_script, write_result
from yolocompress.data.records import Record
from yolocompress.eval.coco import COCOEvaluator
from yolocompress.eval.detections import Detections
from yolocompress.eval.evaluator import DatasetEvaluator
from yolocompress.eval.voc import VOCEvaluator

SECTION = "## Evaluation speed"


def synthetic(n_images: int, dets_per_image: int, n_classes: int, seed: int):
    """VOC-like images (1-8 objects, 10 % difficult) and detections: 3/4 jittered ground truth, 1/4 random."""
    rng = np.random.default_rng(seed)
    records, dets = [], []
    for i in range(n_images):
        g = int(rng.integers(1, 9))
        xy = rng.uniform(0, 400, (g, 2))
        gt = np.concatenate([xy, xy + rng.uniform(10, 200, (g, 2))], 1).round()
        labels = rng.integers(0, n_classes, g)
        records.append(Record(f"/synthetic/{i:06d}.jpg", 640, 480, gt, labels, rng.random(g) < 0.1))
        src = rng.integers(0, g, dets_per_image)
        near = rng.random(dets_per_image) < 0.75
        xy = rng.uniform(0, 400, (dets_per_image, 2))
        boxes = np.where(near[:, None], gt[src] + rng.normal(0, 8, (dets_per_image, 4)),
                         np.concatenate([xy, xy + rng.uniform(10, 200, (dets_per_image, 2))], 1))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        det_labels = np.where(near & (rng.random(dets_per_image) < 0.9), labels[src],
                              rng.integers(0, n_classes, dets_per_image))
        dets.append(Detections(f"{i:06d}", boxes, rng.random(dets_per_image), det_labels))
    return records, dets


def time_evaluator(ev: DatasetEvaluator, records, dets, batch: int) -> tuple[float, float, dict]:
    """Seconds spent in process() over all batches and in evaluate(), and the metrics."""
    ev.reset()
    t0 = time.perf_counter()
    for lo in range(0, len(records), batch):
        ev.process(records[lo:lo + batch], dets[lo:lo + batch])
    t1 = time.perf_counter()
    metrics = ev.evaluate()
    return t1 - t0, time.perf_counter() - t1, metrics




def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dets-per-image", type=int, default=20)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="images per process() call")
    ap.add_argument("--repeat", type=int, default=3, help="VOC runs; the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-coco", action="store_true", help="skip the (slow) COCO metric")
    ap.add_argument("--write", action="store_true", help=f"write the table to docs/BENCHMARKS.md ({SECTION})")
    args = ap.parse_args(argv)

    records, dets = synthetic(args.images, args.dets_per_image, args.classes, args.seed)
    names = [f"class{c}" for c in range(args.classes)]
    n_det = sum(len(d) for d in dets)
    rows = []
    voc_runs = [time_evaluator(VOCEvaluator(names), records, dets, args.batch) for _ in range(args.repeat)]
    p, e, m = min(voc_runs, key=lambda r: r[0] + r[1])
    rows.append(("VOC (`VOCEvaluator`)", p, e, f"map50_voc07 {m['map50_voc07']:.4f}, map50_all {m['map50_all']:.4f}"))
    if not args.no_coco:
        p, e, m = time_evaluator(COCOEvaluator(names), records, dets, args.batch)
        rows.append(("COCO (`COCOEvaluator`, pycocotools)", p, e,
                     f"coco_map {m['coco_map']:.4f}, coco_map50 {m['coco_map50']:.4f}"))

    table = ["| metric | images | detections | classes | process (s) | evaluate (s) | total (s) | values |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    table += [f"| {name} | {args.images} | {n_det} | {args.classes} | {p:.3f} | {e:.3f} | {p + e:.3f} | {v} |"
              for name, p, e, v in rows]
    print("\n".join(table))
    if args.write:
        write_result(SECTION, f"synthetic VOC-like data, seed {args.seed}; VOC: fastest of "
                     f"{args.repeat} runs; target: VOC total < 2 s", machine("pycocotools"),
                     "\n".join(table))


if __name__ == "__main__":
    run_script(main)
