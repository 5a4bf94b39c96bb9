"""Benchmark arms: a shared sparse model -> pruned by one method to a FLOPs budget -> recovered by
attention distillation or plain fine-tuning (or, the scratch control, its architecture trained
from random initialisation) -> scored like a pipeline stage.

Every arm runs in its own folder `<root>/<arm>-seed<S>/` (then distilled/ or finetuned/; the
pruned model of a pruning method in `<root>/<pruning>/pruned/`), so finished pieces are reused
(by the stages' one skip rule, inputs.py) when a benchmark is re-run; `Arm` names the pruning and
the recovery (a registered stage's `recovery`, or the experiment's `pipeline.recovery`,
stages.py). An arm that runs what another arm runs (`ours` is `ours_finetune` or `ours_distill`,
by pipeline.recovery) runs in that arm's folder: one training, two rows.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..artifacts import (artifact_from_model, build_model, lineage_of, load_artifact, load_parent,
                         save_artifact)
from ..compress.distill_stage import run_distill, run_finetune
from ..compress.prune_search import Calibrated
from ..compress.prune_stage import run_prune
from ..compress.scratch_stage import run_scratch, trained_epochs
from ..config import Config
from ..data.descriptor import load_descriptor, load_split
from ..errors import YoloCompressError
from ..fileio import atomic_open, remove_stale_temps
from ..inputs import reuse_complete, stage_inputs
from ..models.cfg import parse_cfg
from ..models.profile import profile_summary
from ..pipeline import score_artifact
from ..stages import ARMS, Arm, recovery_stages
from ..train.run import config_evaluator, with_stage_budget

__all__ = ["Arm", "ARMS", "arm_config", "arm_folder", "prune_arm", "recover", "run_arm",
           "recovery_epochs", "scratch_config"]


def arm_config(config: Config, root: Path, folder: str, seed: int | None = None) -> Config:
    """`config` writing to <root>/<folder>/<stage>/ (seed: train.seed of the recovery)."""
    train = dataclasses.replace(config.train, out_dir=str(root),
                                seed=config.train.seed if seed is None else seed)
    return dataclasses.replace(config, name=folder, train=train)


def _tp_prune_artifact(config: Config, sparse: Path, budget: float, out: Path) -> None:
    from ..compress.tp_baseline import tp_prune

    desc = load_descriptor(config.require_file("data.descriptor"))
    art = load_parent(sparse, desc.names, "pruned", role="source")
    # the budget is not in the config: it names the folder (<root> = .../flops<percent>/)
    inputs = stage_inputs(config, "pruned", parent=art["sha256"])
    if reuse_complete("pruned", out, inputs):
        return
    remove_stale_temps(out.parent)
    size = config.model.img_size
    pruned, info = tp_prune(build_model(art, source=str(sparse)), budget, size,
                            importance="bn_scale")
    if config.prune.recalibrate:          # the same BN recalibration as our prune stage
        train = load_split(desc, "train", strict=config.data.strict)
        Calibrated.from_config(config, train, pruned.letterbox, desc.names).recalibrate(pruned)
    prof = profile_summary(pruned.blocks, size, size)
    scores = config_evaluator(config, load_split(desc, "val", strict=config.data.strict),
                              desc.names, pruned.letterbox)(pruned)
    save_artifact(artifact_from_model(pruned, "pruned", art["classes"], input_size=[size, size],
                                      config=config.to_dict(), parent=art["sha256"],
                                      lineage=lineage_of(art), inputs=inputs,
                                      metrics={"params": prof["params"], "flops": prof["flops"],
                                               **scores},
                                      torch_pruning=info), out)
    with atomic_open(out.parent / "metrics.json", "w", encoding="utf-8") as f:
        json.dump({"stage": "pruned", "method": "torch_pruning", "inputs": inputs, **info}, f,
                  indent=2)


def prune_arm(config: Config, root: Path, pruning: str, sparse: Path, budget: float) -> Path:
    """The sparse model pruned by `pruning` to remove `budget` of its FLOPs, in
    <root>/<pruning>/pruned/best.pt (reused when complete with the same inputs)."""
    out = root / pruning / "pruned" / "best.pt"
    cfg = arm_config(config, root, pruning)
    if pruning == "torch_pruning":        # as shipped: no reconstruction, which is ours
        _tp_prune_artifact(dataclasses.replace(cfg, prune=dataclasses.replace(
            cfg.prune, reconstruct=0)), sparse, budget, out)
        return out
    # ours: the experiment's prune section as it is (the pipeline's method) aimed at the budget;
    # global: network slimming, one threshold on raw |gamma| over every prunable conv, bisected
    # (as published: no reconstruction, which is ours)
    settings = {"ours": {},
                "global": {"grouping": "global", "importance": "bn_gamma_abs",
                           "budget_method": "scale", "percents": (0.5,), "layers": 0,
                           "reconstruct": 0}}
    if pruning not in settings:
        raise YoloCompressError(f"unknown pruning method '{pruning}' (ours, global, "
                                f"torch_pruning)")
    pc = dataclasses.replace(cfg.prune, budget_target="flops", budget_ratio=budget,
                             **settings[pruning])
    run_prune(dataclasses.replace(cfg, prune=pc), from_artifact=sparse, out=out,
              latency_iters=0)
    return out


def _flops(path: Path, size: int) -> float:
    return profile_summary(parse_cfg(load_artifact(path)["cfg"], source=f"{path}[cfg]"),
                           size, size)["flops"]


def iterative_steps(config: Config, n_train: int) -> tuple[int, int]:
    """(fine-tune epochs after each prune but the last, the final recovery's epochs): the
    recovery budget split evenly over bench.iterative_steps, so the arm trains no longer."""
    total, k = recovery_epochs(config, n_train), config.bench.iterative_steps
    between = total // k
    if between < 1:
        raise YoloCompressError(f"bench.iterative_steps={k}: the recovery's {total} epochs leave "
                                f"none between the prunes (at most {total} steps)")
    return between, total - (k - 1) * between


def iterative_prune(config: Config, root: Path, sparse: Path, budget: float, seed: int,
                    n_train: int) -> tuple[Path, int]:
    """Torch-Pruning's iterative recipe: `sparse` pruned by the experiment's method in
    bench.iterative_steps prunes to the FLOPs budget (after step i, (1 - budget)^(i/k) of its
    FLOPs are left; each step aims at that from the FLOPs the last one reached), each but the
    last followed by a plain fine-tune (seed `seed`). Folders <root>/step<i>/{pruned,finetuned}/;
    returns (the last pruned artifact, the epochs left for its recovery)."""
    k, size = config.bench.iterative_steps, config.model.img_size
    if config.prune.layers:
        raise YoloCompressError("the ours_iterative arm prunes channels only (prune.layers=0): "
                                "the distillation's layer names follow one layer pruning")
    between, final = iterative_steps(config, n_train)
    f0, current = _flops(sparse, size), sparse
    for i in range(1, k + 1):
        ratio = 1 - (1 - budget) ** (i / k) * f0 / _flops(current, size)
        cfg = arm_config(config, root, f"step{i}", seed)
        pc = dataclasses.replace(cfg.prune, budget_target="flops", budget_ratio=ratio)
        pruned = run_prune(dataclasses.replace(cfg, prune=pc), from_artifact=current,
                           out=root / f"step{i}" / "pruned" / "best.pt", latency_iters=0)
        if i < k:
            current = run_finetune(with_recovery_epochs(cfg, between), pruned)
    return pruned, final


def with_recovery_epochs(config: Config, epochs: int) -> Config:
    """`config` whose distill / fine-tune recovery trains exactly `epochs` epochs."""
    return dataclasses.replace(config, distill=dataclasses.replace(config.distill, epochs=epochs,
                                                                   steps=None))


def recovery_epochs(config: Config, n_train: int) -> int:
    """The epochs every distill / fine-tune recovery trains (distill.epochs, or its steps)."""
    return with_stage_budget(config, config.distill, n_train).train.epochs


def scratch_config(config: Config, sparse: Path, n_train: int) -> Config:
    """The scratch arm's training: bench.scratch_epochs (null: the epochs behind the sparse model
    plus a recovery's, as many as the pruned-and-recovered arms trained in all) at
    bench.scratch_lr (null: train.lr)."""
    bc = config.bench
    epochs = bc.scratch_epochs or trained_epochs(sparse) + recovery_epochs(config, n_train)
    return dataclasses.replace(config, train=dataclasses.replace(
        config.train, epochs=epochs, lr=bc.scratch_lr or config.train.lr))


def recover(config: Config, recovery: str, pruned: Path, teacher: Path) -> Path:
    """The best.pt of `pruned` recovered by `recovery` (distill: from `teacher`; finetune)."""
    if recovery == "distill":
        return run_distill(config, pruned, teacher)
    if recovery == "finetune":
        return run_finetune(config, pruned)
    raise ValueError(f"unknown recovery {recovery!r}")


def arm_folder(config: Config, arm: Arm) -> str:
    """The arm whose folder `arm` runs in: itself, or for a `pipeline` recovery the arm with a fixed
    recovery that runs the same pruning and recovery under `config` (if one is registered)."""
    if arm.recovery != "pipeline":
        return arm.name
    recovery = arm.recovery_of(config)
    return next((a.name for a in ARMS.values()
                 if a.pruning == arm.pruning and a.recovery == recovery), arm.name)


def run_arm(config: Config, root: Path, arm: Arm, sparse: Path, budget: float, seed: int,
            latency_iters: int = 30) -> dict:
    """Prune (shared by arms with the same pruning), recover with `seed`, score; the report row
    of the recovered model plus method, budget, seed, the mAP right after pruning and the epochs
    the recovery trained (and which recovery it was)."""
    recovery = arm.recovery_of(config)
    folder = f"{arm_folder(config, arm)}-seed{seed}"
    cfg = arm_config(config, root, folder, seed)
    n_train = len(load_split(load_descriptor(cfg.require_file("data.descriptor")), "train",
                             strict=cfg.data.strict))
    before = 0                          # epochs trained after the sparse model, before recovery
    if arm.pruning == "iterative":      # pruned per seed: the fine-tunes between prunes are seeded
        pruned, final = iterative_prune(config, root / folder, sparse, budget, seed, n_train)
        before = recovery_epochs(config, n_train) - final
        cfg = with_recovery_epochs(cfg, final)
    else:
        pruned = prune_arm(config, root, arm.pruning, sparse, budget)
    if recovery == "scratch":
        cfg = scratch_config(cfg, sparse, n_train)
        best = run_scratch(cfg, pruned)
    else:
        best = recover(cfg, recovery, pruned, sparse)
    epochs = load_artifact(best)["config"]["train"]["epochs"] + before
    row = score_artifact(cfg, recovery_stages()[recovery].name, best, latency_iters)
    row.update(method=arm.name, label=arm.label, budget=budget, seed=seed, epochs=epochs,
               recovery=recovery,
               map50_pruned=load_artifact(pruned)["metrics"].get("map50_voc07"))
    return row
