#!/usr/bin/env python
"""Evaluation (VOC / COCO mAP): the same as `yolocompress eval ...`, e.g.

    python scripts/evaluate.py runs/demo/finetuned/best.pt --data data/demo.yaml --metric voc07
"""
import sys

from yolocompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
