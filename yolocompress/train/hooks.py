"""The standard hooks every stage uses: LR schedule, EMA, evaluation, checkpoints, logging.

Only rank 0 writes files (checkpoints, CSV, TensorBoard, plots); evaluation runs on rank 0 while the
other ranks wait at a barrier.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..artifacts import save_artifact
from ..errors import YoloCompressError
from ..fileio import atomic_open
from ..plotting import new_figure, save_figure
from .distributed import barrier, is_main
from .trainer_base import HookBase

__all__ = ["LRSchedule", "EMAHook", "EvalHook", "CheckpointHook", "LoggerHook", "plot_training_curves"]

POLICIES = ("steps", "cosine")


class LRSchedule(HookBase):
    """Darknet learning-rate policy over OPTIMIZER steps k = 1, 2, ... (Darknet's batch number) of
    the stage's own max_iter: with b = burn_in (capped at floor(max_fraction·max_iter) when
    `max_fraction` is set, so a short stage is not all warm-up), k < b: lr·(k/b)^power; then
    `steps`: lr·Π scales_i over the steps with k >= round(steps_i·max_iter); or `cosine`: from lr
    at k = b to lr·final_ratio at max_iter.
    `lr` is each param group's lr when training starts (kept in group["initial_lr"])."""

    priority = 10

    def __init__(self, burn_in: int = 1000, power: float = 4.0, policy: str = "steps",
                 steps: Sequence[float] = (0.8, 0.9), scales: float | Sequence[float] = 0.1,
                 final_ratio: float = 0.1, max_fraction: float | None = None) -> None:
        if policy not in POLICIES:
            raise YoloCompressError(f"unknown lr policy '{policy}' (one of {', '.join(POLICIES)})")
        scales = [float(scales)] * len(steps) if isinstance(scales, (int, float)) else list(scales)
        if len(scales) != len(steps):
            raise YoloCompressError(f"lr schedule has {len(steps)} steps but {len(scales)} scales")
        if burn_in < 0 or power <= 0 or not all(0 < s < 1 for s in steps) or not 0 <= final_ratio <= 1:
            raise YoloCompressError(f"lr schedule needs burn_in >= 0, power > 0, steps in (0, 1) and "
                                    f"final_ratio in [0, 1]; got {burn_in}, {power}, {list(steps)}, "
                                    f"{final_ratio}")
        if max_fraction is not None and not 0 <= max_fraction < 1:
            raise YoloCompressError(f"lr schedule: burn-in max_fraction must be in [0, 1) or None, "
                                    f"got {max_fraction}")
        self.burn_in, self.power, self.policy = burn_in, power, policy
        self.steps, self.scales, self.final_ratio = [float(s) for s in steps], scales, final_ratio
        self.max_fraction = max_fraction

    def burn_in_steps(self, max_iter: int) -> int:
        """The warm-up length of a stage of `max_iter` optimizer steps."""
        if self.max_fraction is None:
            return self.burn_in
        return min(self.burn_in, math.floor(self.max_fraction * max_iter))

    def factor(self, k: int, max_iter: int) -> float:
        """lr multiplier at 1-based optimizer step k of max_iter."""
        burn_in = self.burn_in_steps(max_iter)
        if k < burn_in:
            return (k / burn_in) ** self.power
        if self.policy == "steps":
            f = 1.0
            for s, scale in zip(self.steps, self.scales):
                if k >= round(s * max_iter):
                    f *= scale
            return f
        t = min(1.0, max(0.0, (k - burn_in) / max(1, max_iter - burn_in)))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def peak(self, max_iter: int) -> float:
        """The largest multiplier any of the `max_iter` steps gets (1 unless warm-up or an early
        lr step keep the stage below its configured lr)."""
        return max(self.factor(k, max_iter) for k in range(1, max_iter + 1))

    def _apply(self) -> None:
        f = self.factor(self.trainer.iter + 1, self.trainer.max_iter)
        for g in self.trainer.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    def before_train(self) -> None:
        for g in self.trainer.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self._apply()

    def before_optimizer_step(self) -> None:
        self._apply()


class EMAHook(HookBase):
    """Updates `trainer.ema` after every optimizer step the AMP scaler did not skip.
    The Trainer adds it by itself when given `ema=`."""

    priority = 20

    def before_train(self) -> None:
        if self.trainer.ema is None:
            raise YoloCompressError("EMAHook needs Trainer(ema=ModelEMA(model))")

    def after_optimizer_step(self) -> None:
        if not self.trainer.step_skipped:
            self.trainer.ema.update(self.trainer.module)


class EvalHook(HookBase):
    """`fn(model) -> {metric: value}` on `trainer.model_for_eval` (eval mode, no grad) after every
    `every`-th epoch and the last (every=0: last only); results go into `trainer.storage`, and
    leave it after an epoch that is not evaluated (the log, the checkpoints and the best.pt
    choice never see a score of other weights). With `main_only` (default) rank 0 evaluates and
    the other ranks wait."""

    priority = 60

    def __init__(self, fn: Callable[[nn.Module], dict[str, Any]], every: int = 1,
                 main_only: bool = True) -> None:
        if every < 0:
            raise YoloCompressError(f"EvalHook every must be >= 0, got {every}")
        self.fn, self.every, self.main_only = fn, every, main_only
        self.keys: set[str] = set()

    def after_epoch(self) -> None:
        t = self.trainer
        done = t.epoch + 1
        for k in self.keys:             # the last evaluation's scores belong to other weights
            t.storage.pop(k, None)
        self.keys = set()
        if not (done == t.epochs or (self.every and done % self.every == 0)):
            return
        if is_main() or not self.main_only:
            model = t.model_for_eval
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    metrics = self.fn(model)
            finally:
                model.train(was_training)
            if not isinstance(metrics, dict):
                raise YoloCompressError(f"the evaluation function must return a dict of metrics, "
                                        f"got {type(metrics).__name__}")
            self.keys = set(metrics)
            t.storage.update(metrics)
        if self.main_only:
            barrier()

    def state_dict(self) -> dict:
        return {"keys": sorted(self.keys)} if self.keys else {}

    def load_state_dict(self, state: dict) -> None:
        self.keys = set(state["keys"])


def _finite(model: nn.Module) -> bool:
    flags = [torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class CheckpointHook(HookBase):
    """`last.pt` after every epoch (artifact + `train_state`), `best.pt` whenever
    `trainer.storage[metric]` improves (or at the end, if the metric never appeared). With
    `best_from` > 0 only epochs e (1-based) with e >= best_from·epochs compete for best.pt (a
    stage whose point is the state it reaches, as sparse training, saves a model from its end).

    `make_artifact_fn(model, metrics) -> artifact dict` (e.g. via `artifact_from_model`); `model` is
    `trainer.model_for_eval` (the EMA weights when EMA is on), `metrics` a copy of trainer.storage.
    Writes are atomic and on rank 0 only. Weights that turned non-finite are never saved: that is
    an error, and the files of the last good epoch stay."""

    priority = 80

    def __init__(self, out_dir: str | os.PathLike, make_artifact_fn: Callable[[nn.Module, dict], dict],
                 metric: str = "map50_voc07", mode: str = "max", best_from: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise YoloCompressError(f"CheckpointHook mode must be 'max' or 'min', got '{mode}'")
        if not 0 <= best_from <= 1:
            raise YoloCompressError(f"CheckpointHook best_from must be in [0, 1], got {best_from}")
        self.best_from = best_from
        self.out_dir = Path(out_dir)
        self.last_path, self.best_path = self.out_dir / "last.pt", self.out_dir / "best.pt"
        self.make_artifact_fn, self.metric, self.mode = make_artifact_fn, metric, mode
        self.best: float | None = None

    def _artifact(self, train_state: bool) -> dict:
        t = self.trainer
        art = self.make_artifact_fn(t.model_for_eval, dict(t.storage))
        if not isinstance(art, dict):
            raise YoloCompressError(f"make_artifact_fn must return an artifact dict, got "
                                    f"{type(art).__name__}")
        if train_state:
            art["train_state"] = t.state_dict()
        return art

    def save_last(self) -> None:
        """Write last.pt with the trainer's current state (used after epochs and on interrupts)."""
        if not is_main():
            return
        if not _finite(self.trainer.module):
            raise YoloCompressError(f"weights became non-finite in epoch {self.trainer.epoch + 1}; "
                                    f"not overwriting {self.last_path}")
        save_artifact(self._artifact(train_state=True), self.last_path)

    def after_epoch(self) -> None:
        t = self.trainer
        value = t.storage.get(self.metric) if t.epoch + 1 >= self.best_from * t.epochs else None
        improved = value is not None and math.isfinite(float(value)) and (
            self.best is None or (float(value) > self.best if self.mode == "max"
                                  else float(value) < self.best))
        if improved:
            self.best = float(value)
        # best.pt before last.pt: last.pt records `best`, and a run resumed from it must find
        # that best.pt on disk (a kill between the two writes then only repeats this epoch)
        if is_main() and (improved or (t.epoch + 1 == t.epochs and self.best is None)):
            save_artifact(self._artifact(train_state=False), self.best_path)
        self.save_last()

    def on_interrupt(self) -> None:
        self.save_last()

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class LoggerHook(HookBase):
    """Per-epoch CSV (`epoch, iter` then every scalar in trainer.storage: `train/<term>` epoch means,
    lr, images_per_s, data_wait_share, metrics), TensorBoard scalars (and histograms of the tensors
    stored under `hist/<name>`) when `torch.utils.tensorboard` imports, and the training-curve PNG
    at the end. Runs before
    CheckpointHook, so the rows saved in last.pt include the epoch just finished."""

    priority = 70

    def __init__(self, out_dir: str | os.PathLike, csv_name: str = "train_log.csv",
                 plot_name: str = "training_curves.png", tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.csv_path, self.plot_path = self.out_dir / csv_name, self.out_dir / plot_name
        self.tensorboard = tensorboard
        self.rows: list[dict[str, float]] = []
        self._writer = None

    def before_train(self) -> None:
        if self.tensorboard and is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:   # tensorboard is optional
                return
            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def after_epoch(self) -> None:
        if not is_main():
            return
        t = self.trainer
        row = {"epoch": t.epoch + 1, "iter": t.iter,
               **{k: v for k, v in t.storage.items() if _is_scalar(v)}}
        self.rows.append(row)
        tqdm.write(_epoch_line(row, t.epochs))
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with atomic_open(self.csv_path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        if self._writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "iter"):
                    self._writer.add_scalar(k, v, row["epoch"])
            for k, v in t.storage.items():   # e.g. a stage's "hist/..." value distributions
                if k.startswith("hist/") and torch.is_tensor(v):
                    self._writer.add_histogram(k[5:], v.detach().float().cpu(), row["epoch"])
            self._writer.flush()

    def after_train(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if is_main() and self.rows:
            plot_training_curves(self.csv_path, self.plot_path)

    def state_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]


def _epoch_line(row: dict, epochs: int) -> str:
    """One summary line per epoch, e.g. for logs where no progress bar is drawn."""
    terms = " ".join(f"{k[6:]} {v:.3g}" for k, v in row.items() if k.startswith("train/"))
    metrics = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("map", "coco")))
    speed = row.get("images_per_s", math.nan)
    return (f"epoch {row['epoch']}/{epochs}: {terms} | lr {row.get('lr', math.nan):.3g} | "
            f"{speed:.1f} img/s" + (f" | {metrics}" if metrics else ""))


def plot_training_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Loss terms, learning rate and metrics against epoch from a LoggerHook CSV, as one PNG."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise YoloCompressError(f"{csv_path}: cannot read training log ({e.strerror})") from e
    if not rows or "epoch" not in rows[0]:
        raise YoloCompressError(f"{csv_path}: not a training log (no rows or no 'epoch' column)")

    def column(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else math.nan for r in rows]

    names = list(rows[0])
    losses = [c for c in names if c.startswith("train/")]
    metrics = [c for c in names if c.startswith(("map", "coco"))]
    sparsity = [c for c in names if c.startswith("sparse/") and c.count("/") == 1]
    panels = [(title, cols) for title, cols in (("training loss", losses), ("learning rate", ["lr"]),
                                                ("metrics", metrics), ("sparsity", sparsity))
              if cols and cols[0] in names]
    x = column("epoch")
    fig = new_figure(5 * max(len(panels), 1), 4)
    for i, (title, cols) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c in cols:
            ax.plot(x, column(c), marker="o", markersize=3, label=c)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(cols) > 1 or title == "metrics":
            ax.legend(fontsize=8)
    return save_figure(fig, png_path)
