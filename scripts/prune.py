#!/usr/bin/env python
"""Stage 2 (group channel pruning): the same as `yolocompress prune ...`, e.g.

    python scripts/prune.py --config cfg/experiments/demo.yaml \
        --from runs/demo/sparse/best.pt prune.budget_target=flops prune.budget_ratio=0.4
"""
import sys

from yolocompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
