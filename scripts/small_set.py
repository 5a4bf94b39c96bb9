#!/usr/bin/env python
"""A small VOC-layout data set cut from the built-in demo set, and an experiment that runs the demo
recipe on it: what README "Small data sets" measures (`--train 60 --val 60`).

    python scripts/small_set.py --out /tmp/small60 --train 60 --val 60
    yolocompress pipeline --config /tmp/small60/exp.yaml

Writes <out>/VOCsmall/{Annotations,JPEGImages,ImageSets/Main/{train,val}.txt} with the first N
ids of the demo's train and val lists, <out>/data.yaml (format: voc) and <out>/exp.yaml
(`_base_:` this checkout's cfg/experiments/demo.yaml, that descriptor, data.workers 0).
"""
import argparse
import shutil
import sys
from pathlib import Path

from yolocompress.data.synthetic import ensure_demo

REPO = Path(__file__).resolve().parent.parent
NAMES = "[circle, square, triangle, star, cross, ring]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train", type=int, default=60)
    p.add_argument("--val", type=int, default=60)
    a = p.parse_args(argv)
    if a.out.exists():
        print(f"error: {a.out}: exists; choose a new folder", file=sys.stderr)
        return 2
    src = ensure_demo() / "VOCdemo"
    dst = a.out / "VOCsmall"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / sub).mkdir(parents=True)
    for split, n in (("train", a.train), ("val", a.val)):
        ids = (src / "ImageSets/Main" / f"{split}.txt").read_text().split()[:n]
        for i in ids:
            shutil.copy2(src / "Annotations" / f"{i}.xml", dst / "Annotations")
            shutil.copy2(src / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages")
        (dst / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (a.out / "data.yaml").write_text(
        f"format: voc\nroot: .\ntrain: [small/train]\nval: [small/val]\nnames: {NAMES}\n")
    (a.out / "exp.yaml").write_text(
        f"_base_: {REPO / 'cfg/experiments/demo.yaml'}\nname: small\n"
        f"data:\n  descriptor: data.yaml\n  workers: 0\n"
        f"pipeline:\n  baseline: {REPO / 'cfg/experiments/demo-baseline.pt'}\n")
    print(f"{a.out}: {a.train} train / {a.val} val images; run: yolocompress pipeline "
          f"--config {a.out / 'exp.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
