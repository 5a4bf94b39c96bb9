"""`yolocompress scratch`: pruning's control ("Rethinking the Value of Network Pruning", Liu et
al. 2019) -- the architecture of a pruned artifact, re-initialised at random (seeded by
train.seed, as a baseline from scratch) and trained with the `train` section (epochs, lr).

The artifact gets stage `scratch`, the pruned artifact as parent (its architecture's source: no
weight is inherited), the pruned artifact's `prune` record (the cfg is the pruned one) and a
`scratch` record {epochs}. `trained_epochs` counts the epochs behind an artifact, so the bench's
scratch arm trains as long as the chain it is compared with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..artifacts import file_sha256, load_artifact, load_parent
from ..config import Config
from ..errors import YoloCompressError
from ..models.cfg import parse_cfg
from ..models.darknet import Darknet
from ..stages import get_stage
from ..train.run import DataSplits, StageParts, train_built

__all__ = ["run_scratch", "build_scratch", "trained_epochs", "command"]


def run_scratch(config: Config, pruned_artifact: str | os.PathLike, force: bool = False) -> Path:
    """Train the architecture of `pruned_artifact` from random initialisation for train.epochs;
    returns the stage's best.pt (runs/<name>/scratch/)."""
    return train_built(config, "scratch", force, student=pruned_artifact)


def build_scratch(config: Config, data: DataSplits, student: str | os.PathLike
                  ) -> tuple[Config, StageParts]:
    art = load_parent(student, data.names, "scratch", role="architecture")
    torch.manual_seed(config.train.seed)
    model = Darknet(parse_cfg(art["cfg"], source=f"{art['path']}[cfg]"))
    model.initialize()
    extra = {"scratch": {"epochs": config.train.epochs}}
    if art.get("prune") is not None:
        extra["prune"] = art["prune"]
    return config, StageParts(model=model, parent=art, extra=extra)


def trained_epochs(path: str | os.PathLike) -> int:
    """Training epochs behind the artifact at `path`: its own (a training stage's recorded
    train.epochs) plus every ancestor's in its lineage since the last scratch stage (which
    inherits no weights; each file must still be the one recorded). An ancestor trained outside
    yolocompress (an imported model) cannot be counted: an error."""
    path = Path(path)
    art = load_artifact(path)
    chain = [(step["stage"], Path(step["path"]), step["sha256"]) for step in art.get("lineage", [])]
    total = 0
    for stage, where, sha in [*chain, (art["stage"], path, None)]:
        if stage == "imported":
            raise YoloCompressError(f"{where}: an imported model, trained outside yolocompress; "
                                    f"its epochs are unknown (set bench.scratch_epochs)")
        if get_stage(stage).build is None:          # pruning trains nothing
            continue
        if not where.is_file():
            raise YoloCompressError(f"{path}: its ancestor {where} is gone, so its epochs cannot "
                                    f"be counted (set bench.scratch_epochs)")
        if sha is not None and file_sha256(where) != sha:
            raise YoloCompressError(f"{where}: changed since {path} was made from it (sha256 "
                                    f"differs; set bench.scratch_epochs)")
        step = art if sha is None else load_artifact(where)
        epochs = int(step["config"]["train"]["epochs"])
        total = epochs if stage == "scratch" else total + epochs
    return total


def command(config: Config, args: Any) -> Path:
    """`yolocompress scratch`."""
    return run_scratch(config, args.student, force=args.force)
