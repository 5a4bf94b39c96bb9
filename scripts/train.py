#!/usr/bin/env python
"""Baseline training: the same as `yolocompress train ...`, e.g.

    python scripts/train.py --config cfg/experiments/demo.yaml train.epochs=10
"""
import sys

from yolocompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
