#!/usr/bin/env python
"""Stage 1 (dynamic sparse training of BN gammas): the same as `yolocompress sparse ...`, e.g.

    python scripts/sparse_train.py --config cfg/experiments/demo.yaml \
        --from runs/demo/baseline/best.pt sparse.s=1e-4
"""
import sys

from yolocompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["sparse", *sys.argv[1:]]))
