"""Experiment config -> data, model, Trainer and hooks -> artifacts in runs/<name>/<stage>/.

`run_stage` is the one place a training stage is assembled. What a stage adds to the loop is a
`StageParts` (starting model, parent / teacher artifacts, hooks, criterion wrapper, artifact
extras, lr multiplier) made by the builder its registry entry names (stages.py `build`);
`train_built(config, stage, force, **sources)` runs builder + run_stage. The Trainer itself
(loader, criterion, optimizer, EMA, schedule) is assembled by `build_trainer`, which a training
outside the stages (centroid fine-tuning, compress/share_finetune.py) uses too.
Skip and resume follow the one rule of inputs.py: a complete stage (best.pt and metrics.json)
is reused only when its recorded inputs (parent / teacher sha256, the config sections it reads)
equal the current ones, else it is an error naming the change (`--force` redoes it); an
incomplete one continues from `<run dir>/last.pt` if that holds a `train_state` with the same
inputs. Stale temp files of killed writers in the run folder are removed before training.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..artifacts import (artifact_from_model, build_model, file_sha256, lineage_of, load_artifact,
                         load_parent)
from ..config import Config
from ..data.dataset import DetectionDataset, build_loader
from ..data.descriptor import DataDescriptor, load_descriptor, load_split
from ..data.records import Record
from ..errors import YoloCompressError
from ..eval.evaluate import METRIC_KEYS, ModelEvaluator, evaluate_model
from ..fileio import atomic_open, remove_stale_temps
from ..inputs import check_resume, reuse_complete, stage_inputs
from ..models.cfg import read_cfg
from ..models.darknet import Darknet
from ..models.weights import load_darknet_weights
from ..stages import get_stage, resolve
from .distributed import SeededRandomSampler, cleanup, init_distributed, wrap_ddp
from .ema import ModelEMA
from .engine import HookBase, Trainer
from .hooks import CheckpointHook, EvalHook, LoggerHook, LRSchedule
from .loss import YoloLoss
from .optim import accumulate_steps, build_optimizer

__all__ = ["DataSplits", "load_data", "initial_model", "run_stage", "run_dir", "stage_dir", "MultiScaleHook",
           "detection_criterion", "uses_letterbox", "config_evaluator", "with_stage_budget",
           "optimizer_steps_per_epoch", "describe_schedule", "build_trainer",
           "train_command", "StageParts", "build_baseline", "train_built"]


@dataclass
class DataSplits:
    descriptor: DataDescriptor
    train: list[Record]
    val: list[Record]

    @property
    def names(self) -> list[str]:
        return list(self.descriptor.names)


def load_data(config: Config) -> DataSplits:
    """Descriptor + train/val records (the demo set is generated on first use)."""
    desc = load_descriptor(config.require_file("data.descriptor"))
    strict = config.data.strict
    return DataSplits(desc, load_split(desc, "train", strict=strict),
                      load_split(desc, "val", strict=strict))


def initial_model(config: Config, names: Sequence[str], stage: str = "baseline"
                  ) -> tuple[Darknet, dict | None]:
    """The model to train `stage` from: an artifact (`model.weights: X.pt`, of a stage `stage`
    accepts), Darknet weights, or a seeded random initialisation. Returns (model, parent artifact
    (load_parent) or None)."""
    classes = config.model.classes or len(names)
    if classes != len(names):
        raise YoloCompressError(f"{config.source}: model.classes={classes} but the data set names "
                                f"{len(names)} classes")
    weights = config.weights_path
    if weights is not None and weights.suffix == ".pt":
        parent = load_parent(config.require_file("model.weights"), names, stage)
        return build_model(parent, source=str(weights)), parent
    torch.manual_seed(config.train.seed)
    model = Darknet(read_cfg(config.require_file("model.cfg")), classes=classes)
    model.initialize()
    if weights is not None:
        report = load_darknet_weights(model, config.require_file("model.weights"))
        print(report.summary())
    return model, None


def uses_letterbox(config: Config, model: Darknet) -> bool:
    """`model.letterbox` of the experiment, else what the cfg's [net] letter_box says."""
    return model.letterbox if config.model.letterbox is None else config.model.letterbox


def config_evaluator(config: Config, records: Sequence[Record], names: Sequence[str],
                     letterbox: bool) -> Callable[[nn.Module], dict]:
    """`fn(model) -> {metric: value}` on `records` with the experiment's eval settings."""
    evaluator = ModelEvaluator.from_config(config, names, letterbox)

    def evaluate(m: nn.Module) -> dict:
        res = evaluate_model(m, records, evaluator, progress=False)
        return {k: v for k, v in res.items() if isinstance(v, float)}
    return evaluate


def detection_criterion(loss: YoloLoss) -> Callable[[nn.Module, Sequence[Any]], dict]:
    """criterion(model, (images, targets, metas)) -> {"box", "obj", "cls", "loss"}."""
    def criterion(model: nn.Module, batch: Sequence[Any]) -> dict:
        images, targets = batch[0], batch[1]
        return loss(model(images), targets, (images.shape[-2], images.shape[-1]))
    return criterion


class MultiScaleHook(HookBase):
    """Darknet random=1: every `interval` optimizer steps pick a size in img_size*(1 +- range)
    (multiple of 32) and resize the batch (and its target boxes) to it."""

    priority = 30

    def __init__(self, img_size: int, value_range: float, interval: int, seed: int):
        lo = max(32, int(img_size * (1 - value_range)) // 32 * 32)
        hi = max(lo, int(img_size * (1 + value_range)) // 32 * 32)
        self.sizes = list(range(lo, hi + 1, 32))
        self.img_size, self.interval, self.seed = img_size, interval, seed
        self.size = img_size

    def before_step(self) -> None:
        t = self.trainer
        if t.batch_idx % t.accumulate == 0 and t.iter % self.interval == 0:
            rng = np.random.default_rng([self.seed, t.iter])
            self.size = int(rng.choice(self.sizes))
        images, targets, *rest = t.batch
        if images.shape[-1] == self.size:
            return
        scale = self.size / images.shape[-1]
        images = nn.functional.interpolate(images, size=(self.size, self.size), mode="bilinear",
                                           align_corners=False)
        targets = targets.clone()
        targets[:, 2:] *= scale
        t.batch = (images, targets, *rest)


def optimizer_steps_per_epoch(n_images: int, batch_size: int, accumulate: int,
                              world_size: int = 1) -> int:
    """Optimizer steps in one epoch over `n_images` as `_train`'s loader and the Trainer make them:
    each rank gets ceil(n / world_size) images, in batches with the last partial one dropped when
    the set holds more than one batch, and steps every `accumulate` batches (a partial window
    steps too)."""
    per_rank = math.ceil(n_images / world_size)
    batches = per_rank // batch_size if _drop_last(n_images, batch_size) \
        else math.ceil(per_rank / batch_size)
    return math.ceil(batches / accumulate)


def _drop_last(n_images: int, batch_size: int) -> bool:
    return n_images > batch_size


def with_stage_budget(config: Config, section: Any, n_train: int | None = None) -> Config:
    """`config` with train.epochs / lr / optimizer replaced by a stage section's own (`config.sparse`,
    `config.distill`) where those are set. Without `epochs`, a budget in `steps` becomes the fewest
    whole epochs over the `n_train` training images that give at least that many optimizer steps."""
    changes = {k: getattr(section, k) for k in ("epochs", "lr", "optimizer")
               if getattr(section, k) is not None}
    if section.epochs is None and section.steps is not None:
        if n_train is None:
            raise YoloCompressError("a stage budget in steps needs the training-set size")
        tc = config.train
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_epoch = optimizer_steps_per_epoch(
            n_train, tc.batch_size, accumulate_steps(tc.nominal_batch, tc.batch_size, world), world)
        changes["epochs"] = max(1, math.ceil(section.steps / max(1, per_epoch)))
    if not changes:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))


def run_dir(config: Config) -> Path:
    """The experiment's folder: <train.out_dir>/<experiment name>/."""
    return Path(config.train.out_dir) / (config.name or "experiment")


def stage_dir(config: Config, stage: str) -> Path:
    """Where a stage writes its artifacts: <train.out_dir>/<experiment name>/<stage>/."""
    return run_dir(config) / stage


def run_stage(config: Config, stage: str, *, model: Darknet | None = None,
              parent: dict | None = None, teacher: dict | None = None,
              hooks: Sequence[HookBase] = (), criterion_wrapper: Callable | None = None,
              extra: dict | None = None, force: bool = False, data: DataSplits | None = None,
              lr_mult: tuple[Sequence[nn.Parameter], float] | None = None,
              best_from: float = 0.0) -> Path:
    """Train one stage; returns the path of its best.pt. See the module docstring for skip and
    resume. `parent` / `teacher`: load_parent dicts (their sha256 are inputs); without `model`
    the model comes from `initial_model`. `lr_mult` = (parameters of `model`, m): those train at
    m times the lr (build_optimizer); `best_from`: CheckpointHook's (best.pt from the epochs after
    that share of the stage)."""
    out_dir = stage_dir(config, stage)
    best = out_dir / "best.pt"
    if model is None and config.weights_path is not None and config.weights_path.suffix == ".pt":
        parent_sha = file_sha256(config.require_file("model.weights"))
    else:
        parent_sha = parent["sha256"] if parent else None
    inputs = stage_inputs(config, stage, parent=parent_sha,
                          teacher=teacher["sha256"] if teacher else None)
    if reuse_complete(stage, best, inputs, force):
        return best
    dist = init_distributed(config.train.device)
    try:
        data = data or load_data(config)
        names = data.names
        if model is None:
            model, parent = initial_model(config, names, stage)
        if dist.is_main:
            remove_stale_temps(out_dir)
        return _train(config, stage, model, parent, data, dist, out_dir, hooks,
                      criterion_wrapper, {**(extra or {}), "inputs": inputs}, force, lr_mult,
                      best_from)
    finally:
        cleanup()


@dataclass
class StageParts:
    """What a training stage adds to the one loop. model None: `initial_model(config)`."""
    model: Darknet | None = None
    parent: dict | None = None          # load_parent dicts: their sha256 are inputs
    teacher: dict | None = None
    hooks: Sequence[HookBase] = ()
    criterion_wrapper: Callable | None = None   # detection criterion -> the stage's criterion
    extra: dict = field(default_factory=dict)   # artifact keys, unpacked at every save
    lr_mult: tuple[Sequence[nn.Parameter], float] | None = None
    best_from: float = 0.0              # best.pt only from epochs after this share of the stage


def build_baseline(config: Config, data: DataSplits) -> tuple[Config, StageParts]:
    """The baseline adds nothing: the model from `model.weights` or a seeded initialisation."""
    return config, StageParts()


def train_built(config: Config, stage: str, force: bool = False, **sources: Any) -> Path:
    """Train the registered `stage`: its builder makes (config, StageParts) from the config, the
    data and `sources` (e.g. student=PATH), then `run_stage`; returns its best.pt."""
    data = load_data(config)
    config, parts = resolve(get_stage(stage).build)(config, data, **sources)
    return run_stage(config, stage, model=parts.model, parent=parts.parent, teacher=parts.teacher,
                     hooks=parts.hooks, criterion_wrapper=parts.criterion_wrapper,
                     extra=parts.extra, force=force, data=data, lr_mult=parts.lr_mult,
                     best_from=parts.best_from)


def train_command(config: Config, args: Any) -> Path:
    """`yolocompress train`: the baseline stage, from the experiment as it is."""
    return train_built(config, "baseline", force=args.force)


def build_trainer(config: Config, model: Darknet, train: Sequence[Record], device: torch.device, *,
                  hooks: Sequence[HookBase] = (), criterion_wrapper: Callable | None = None,
                  lr_mult: tuple[Sequence[nn.Parameter], float] | None = None,
                  world_size: int = 1, progress: bool = True) -> tuple[Trainer, LRSchedule]:
    """(Trainer, its LRSchedule): the one assembly of a training run over the `train` records
    with `config.train`'s settings -- the augmented loader (seeded sampler), the detection
    criterion (through `criterion_wrapper`), the optimizer (`lr_mult`: build_optimizer's), EMA,
    the LR schedule, multi-scale, accumulation and AMP -- plus `hooks`. A stage (`_train`) adds
    evaluation, logging and checkpoints; centroid fine-tuning (compress/share_finetune.py) trains
    with it as it is."""
    tc = config.train
    img = config.model.img_size
    model.to(device)
    train_set = DetectionDataset(train, img, config.augment,
                                 letterbox=uses_letterbox(config, model),
                                 cache_images=config.data.cache_images, strict=config.data.strict)
    sampler = SeededRandomSampler(train_set, seed=tc.seed)
    loader = build_loader(train_set, tc.batch_size, shuffle=False, workers=config.data.workers,
                          seed=tc.seed, sampler=sampler,
                          drop_last=_drop_last(len(train_set), tc.batch_size))
    criterion = detection_criterion(YoloLoss(model.heads))
    if criterion_wrapper is not None:
        criterion = criterion_wrapper(criterion)
    optimizer = build_optimizer(model, tc.optimizer, tc.lr, tc.momentum, tc.weight_decay,
                                lr_mult=lr_mult)
    ema = ModelEMA(model, decay=tc.ema_decay) if tc.ema else None
    lr_schedule = LRSchedule(tc.burn_in, tc.burn_in_power, tc.schedule, tc.steps, tc.scales,
                             final_ratio=tc.scales, max_fraction=tc.burn_in_max)
    all_hooks: list[HookBase] = [lr_schedule, *hooks]
    if tc.multi_scale:
        all_hooks.append(MultiScaleHook(img, tc.multi_scale_range, tc.multi_scale_interval, tc.seed))
    train_model = wrap_ddp(model, device) if world_size > 1 else model
    accumulate = accumulate_steps(tc.nominal_batch, tc.batch_size, world_size)
    amp = (device.type == "cuda") if tc.amp is None else tc.amp
    trainer = Trainer(train_model, criterion, optimizer, loader, epochs=tc.epochs,
                      accumulate=accumulate, device=device, amp=amp, grad_clip=tc.grad_clip,
                      hooks=all_hooks, ema=ema, seed=tc.seed, progress=progress)
    return trainer, lr_schedule


def _train(config, stage, model, parent, data, dist, out_dir, hooks, criterion_wrapper, extra,
           force, lr_mult, best_from):
    tc, names = config.train, data.names
    img = config.model.img_size
    letterbox = uses_letterbox(config, model)
    lineage = lineage_of(parent)

    def make_artifact(m: nn.Module, metrics: dict) -> dict:
        keep = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return artifact_from_model(m, stage, names, input_size=[img, img],
                                   config=config.to_dict(), metrics=keep,
                                   parent=parent["sha256"] if parent else None,
                                   lineage=lineage, **extra)

    metric_key = METRIC_KEYS[config.eval.metric]
    trainer, lr_schedule = build_trainer(
        config, model, data.train, dist.device,
        hooks=[EvalHook(config_evaluator(config, data.val, names, letterbox),
                        every=tc.eval_interval),
               LoggerHook(out_dir),
               CheckpointHook(out_dir, make_artifact, metric=metric_key, best_from=best_from),
               *hooks],
        criterion_wrapper=criterion_wrapper, lr_mult=lr_mult, world_size=dist.world_size,
        progress=dist.is_main)
    if dist.is_main:
        for line in describe_schedule(stage, trainer, lr_schedule, tc.lr, lr_mult):
            print(line)
    if not force:
        _maybe_resume(trainer, out_dir / "last.pt", stage, extra["inputs"])
    storage = trainer.train()
    best = out_dir / "best.pt"
    if dist.is_main:
        metrics = {k: v for k, v in storage.items() if isinstance(v, (int, float))}
        final = load_artifact(best)["metrics"]
        with atomic_open(out_dir / "metrics.json", "w", encoding="utf-8") as f:
            json.dump({"stage": stage, "best": final, "last_epoch": metrics,
                       "inputs": extra["inputs"]}, f, indent=2)
        print(f"{stage}: best {metric_key} = {final.get(metric_key, float('nan')):.4f} -> {best}")
    return best


def describe_schedule(stage: str, trainer: Trainer, lr_schedule: LRSchedule, lr: float,
                      lr_mult: tuple[Sequence[nn.Parameter], float] | None = None) -> list[str]:
    """The lines a training stage prints at its start: its length in optimizer steps, warm-up and
    peak lr, and a warning when the lr never reaches the configured value (warm-up longer than
    the stage, or an lr step before the warm-up ends)."""
    n = trainer.max_iter
    peak = lr_schedule.peak(n)
    mult = f" (x{lr_mult[1]:g} on {len(lr_mult[0])} tensors)" if lr_mult else ""
    lines = [f"{stage}: {trainer.epochs} epochs x {trainer.steps_per_epoch} optimizer steps = {n} "
             f"steps, burn-in {lr_schedule.burn_in_steps(n)} steps, peak lr {lr * peak:.3g}{mult}"]
    if peak < 0.99:
        lines.append(f"warning: {stage}: the lr never reaches the configured {lr:g}: it peaks at "
                     f"{lr * peak:.3g} ({peak:.1%}) within the stage's {n} optimizer steps; "
                     f"shorten train.burn_in, set train.burn_in_max, or train the stage longer "
                     f"(epochs / steps)")
    return lines


def _maybe_resume(trainer: Trainer, last: Path, stage: str, inputs: dict) -> None:
    if not last.is_file():
        return
    art = load_artifact(last, check=False)
    state = art.get("train_state")
    if not state:
        return
    check_resume(last, art, stage, inputs)
    trainer.load_state_dict(state)
    print(f"resuming from {last} (epoch {trainer.epoch + 1})")
