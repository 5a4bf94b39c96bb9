"""The Trainer's own hooks: per-epoch training stats (`StatsHook`) and the tqdm bar (`ProgressHook`).

StatsHook counts every completed micro-batch (its logged losses, images, data-loading wait) and
after the epoch puts into `trainer.storage`: `train/<term>` (mean over the epoch's micro-batches,
"loss" the optimised total), `lr` (the first param group's, at the end of the epoch),
`images_per_s` and `data_wait_share` (the share of the epoch's time spent waiting for data). Its
counters survive a mid-epoch resume: the Trainer saves them as `train_state["stats"]`
(`state()` / `load_state()`), not under `hooks`.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from .distributed import is_main
from .trainer_base import HookBase

__all__ = ["StatsHook", "ProgressHook"]


def _fresh() -> dict:
    return {"sums": {}, "count": 0, "images": 0, "wait": 0.0, "time": 0.0, "prev_time": 0.0}


class StatsHook(HookBase):
    """Reads `trainer.last_losses`, `trainer.batch`, `trainer.data_time` (seconds the loader took to
    yield the micro-batch) and `trainer.position`; see the module docstring."""

    priority = 0

    def __init__(self) -> None:
        self.stats = _fresh()
        self._t0: float | None = None   # when the epoch's first micro-batch was requested

    def state(self) -> dict:
        return dict(self.stats, sums=dict(self.stats["sums"]))

    def load_state(self, stats: dict | None) -> None:
        """Counters of a partly done epoch, or None for a fresh start."""
        self.stats = _fresh() if stats is None else dict(stats, sums=dict(stats["sums"]))

    def means(self) -> dict[str, float]:
        """Running mean of every logged term over the epoch so far."""
        s = self.stats
        return {k: v / max(s["count"], 1) for k, v in s["sums"].items()}

    def images_per_s(self) -> float:
        return self.stats["images"] / max(self.stats["time"], 1e-9)

    def before_epoch(self) -> None:
        if self.trainer.position[1] == 0:   # not resuming in the middle of this epoch
            self.stats = _fresh()
        self._t0 = None

    def before_step(self) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter() - self.trainer.data_time

    def after_step(self) -> None:
        t, s = self.trainer, self.stats
        for k, v in t.last_losses.items():
            s["sums"][k] = s["sums"].get(k, 0.0) + v
        s["count"] += 1
        s["images"] += int(t.batch[0].shape[0])
        s["wait"] += t.data_time
        s["time"] = s["prev_time"] + time.perf_counter() - self._t0

    def after_epoch(self) -> None:
        t, s = self.trainer, self.stats
        for k, v in self.means().items():
            t.storage[f"train/{k}"] = v
        t.storage["lr"] = t.lr
        t.storage["images_per_s"] = self.images_per_s()
        t.storage["data_wait_share"] = min(1.0, s["wait"] / max(s["time"], 1e-9))

    def on_interrupt(self) -> None:
        self.stats["prev_time"] = self.stats["time"]   # a resumed epoch continues the clock


class ProgressHook(HookBase):
    """A tqdm bar per epoch on rank 0 (tqdm's own rule: none when the output is not a terminal),
    one tick per micro-batch, with the running term means, lr and images/s from `trainer.stats`."""

    priority = 0

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def before_epoch(self) -> None:
        t = self.trainer
        self._bar = tqdm(total=t.batches_per_epoch, initial=t.position[1], unit="batch",
                         desc=f"epoch {t.epoch + 1}/{t.epochs}", dynamic_ncols=True,
                         disable=None if is_main() else True)

    def after_step(self) -> None:
        t = self.trainer
        post = {k: f"{v:.4g}" for k, v in t.stats.means().items()}
        post["lr"] = f"{t.lr:.3g}"
        post["img/s"] = f"{t.stats.images_per_s():.1f}"
        self._bar.update(1)
        self._bar.set_postfix(post, refresh=False)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def after_epoch(self) -> None:
        self._close()

    def on_interrupt(self) -> None:
        self._close()

    def after_train(self) -> None:
        self._close()
