#!/usr/bin/env python
"""Stage 3 (spatial-attention distillation): the same as `yolocompress distill ...`, e.g.

    python scripts/distill.py --config cfg/experiments/demo.yaml \
        --student runs/demo/pruned/best.pt
"""
import sys

from yolocompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
