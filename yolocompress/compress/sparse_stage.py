"""`yolocompress sparse`: stage 1 as a training stage -- `build_sparse` makes the starting model,
the penalised layers and the schedule from the config (a SparsityHook, the gammas' lr
multiplier), `run_sparse` trains it (train.run.train_built).

The artifact gets stage `sparse`, the starting artifact as parent (lineage), and a `sparsity`
record {schedule, s, schedule parameters, layers (names), stats (of the epoch it was saved at)}.

`check_sparsity` compares what the stage achieved (the share of penalised |γ| below 1e-2 in the
artifact the prune stage will read) with what that stage will remove (the share of penalised
channels its plan cuts, budget mode included): below `sparse.check` times that, the pipeline
stops before pruning with one line naming the fixes (`sparse.check=0` prunes anyway; `--force`
also does, but redoes every stage).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..artifacts import build_model, load_artifact
from ..config import Config
from ..errors import YoloCompressError
from ..models.darknet import ConvLayer, Darknet
from ..train.run import (DataSplits, StageParts, initial_model, stage_dir, train_built,
                         with_stage_budget)
from .sparsity import THRESHOLD, SparsityHook, build_schedule

__all__ = ["penalised_layers", "build_sparse", "run_sparse", "sparsity_needs", "check_sparsity",
           "command", "pipeline_step"]

HIST_PNG = "gamma_histograms.png"
# best.pt (the model pruned) comes from the last fifth of the stage, where the penalty has done its
# work: on a small set a long stage evaluates often, and its early, barely sparse epochs score best
BEST_FROM = 0.8


def penalised_layers(model: Darknet, include_excluded: bool = False) -> list[int]:
    """Indices of the convs whose BN gammas get the L1 penalty: the prunable ones
    (`graph.prunable_layers`), or with `include_excluded` every conv with batch_normalize."""
    if include_excluded:
        return [i for i, m in enumerate(model.layers) if isinstance(m, ConvLayer) and m.bn_enabled]
    from .graph import prunable_layers
    return list(prunable_layers(model.blocks))


def run_sparse(config: Config, from_artifact: str | os.PathLike | None = None,
               force: bool = False) -> Path:
    """Sparse-train from `from_artifact` (else from `model.weights`: an artifact, Darknet weights,
    or a seeded random init); returns the path of the stage's best.pt."""
    return train_built(config, "sparse", force, from_artifact=from_artifact)


def build_sparse(config: Config, data: DataSplits,
                 from_artifact: str | os.PathLike | None = None) -> tuple[Config, StageParts]:
    """The sparse stage's config (its budget, EMA off unless sparse.ema) and parts."""
    if from_artifact is not None:
        path = Path(from_artifact)
        if path.suffix != ".pt":
            raise YoloCompressError(f"{path}: --from takes an artifact (.pt); set model.weights "
                                    f"for Darknet .weights")
        if not path.is_file():
            raise YoloCompressError(f"{path}: no such artifact file")
        # the same as model.weights=<artifact>, which the saved config then records
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, weights=str(path.resolve())))
    config = with_stage_budget(config, config.sparse, len(data.train))
    if not config.sparse.ema:   # the saved (EMA) gammas would lag the penalised ones
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, ema=False))
    schedule = build_schedule(config.sparse, config.train.epochs)
    model, parent = initial_model(config, data.names, "sparse")
    layers = penalised_layers(model, config.sparse.include_excluded)
    if not layers:
        raise YoloCompressError(f"{config.source or 'config'}: {config.model.cfg} has no prunable "
                                f"conv with batch_normalize to sparse-train")
    hook = SparsityHook(layers, schedule, plot_path=stage_dir(config, "sparse") / HIST_PNG)
    # run_stage unpacks `extra` at every save, so each artifact holds the hook's record as of then
    mult = config.sparse.gamma_lr_mult
    lr_mult = ([model.layers[i].bn.weight for i in layers], mult) if mult != 1.0 else None
    return config, StageParts(model=model, parent=parent, hooks=[hook],
                              extra={"sparsity": hook.record}, lr_mult=lr_mult,
                              best_from=BEST_FROM)


def sparsity_needs(config: Config, path: str | os.PathLike) -> tuple[float, float]:
    """(achieved, needed) for the sparse artifact at `path`: the share of its penalised |γ| below
    THRESHOLD, and the share of those channels the config's prune plan removes."""
    from .prune import keep_from_record
    from .prune_stage import plan_from_config
    model = build_model(load_artifact(path), source=str(path))
    layers = penalised_layers(model, config.sparse.include_excluded)
    gammas = [model.layers[i].bn.weight.detach().abs() for i in layers]
    total = sum(g.numel() for g in gammas)
    achieved = sum(int((g < THRESHOLD).sum()) for g in gammas) / total
    keep = keep_from_record(model.blocks, plan_from_config(config, model.blocks,
                                                           model.state_dict())[1])
    removed = sum(g.numel() - len(keep[i]) for i, g in zip(layers, gammas) if i in keep)
    return achieved, removed / total


def check_sparsity(config: Config, path: str | os.PathLike, force: bool = False,
                   stop: bool = True) -> tuple[float, float]:
    """Print what stage 1 achieved against what pruning needs; when it is under `sparse.check`
    times the need, raise (`stop` and not `force`) or print a warning. Returns (achieved,
    needed)."""
    achieved, needed = sparsity_needs(config, path)
    print(f"sparse: {achieved:.1%} of the penalised |gamma| below {THRESHOLD:g} in {path}; the "
          f"prune stage removes {needed:.1%} of those channels")
    ratio = config.sparse.check
    if ratio > 0 and achieved < ratio * needed:
        problem = (f"{path}: stage 1 left {achieved:.1%} of the penalised BN gammas below "
                   f"{THRESHOLD:g}, but pruning removes {needed:.1%} of those channels (needs >= "
                   f"{ratio * needed:.1%}, sparse.check={ratio:g}): train stage 1 longer "
                   f"(sparse.steps), raise sparse.s or use sparse.schedule=target "
                   f"sparse.target_fraction={min(0.95, max(0.05, needed)):.2f}")
        if stop and not force:
            raise YoloCompressError(problem + "; sparse.check=0 prunes anyway")
        print(f"warning: {problem}")
    return achieved, needed


def command(config: Config, args: Any) -> Path:
    """`yolocompress sparse`: trains, then reports the check (a warning, never a stop)."""
    path = run_sparse(config, from_artifact=args.from_artifact, force=args.force)
    try:
        check_sparsity(config, path, stop=False)
    except YoloCompressError as e:   # e.g. a prune budget out of reach: the prune command says so
        print(f"warning: sparse: cannot compare with the prune stage's needs: {e}")
    return path


def pipeline_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int) -> Path:
    """Stage 1 of the pipeline (adopted from `pipeline.sparse` when set: a sparse artifact trained
    from this baseline); stops it (check_sparsity) when pruning would cut live channels."""
    from ..pipeline import adopted_or_trained
    path = adopted_or_trained(
        config, "sparse", force,
        lambda: run_sparse(config, from_artifact=paths["baseline"], force=force),
        parent=paths["baseline"])
    check_sparsity(config, path, force)
    return path
