"""The one training loop. `Trainer` runs epochs of micro-batches (`TrainStep`: AMP, gradient
accumulation, DDP no_sync, NaN checks, the loss rule), stops gracefully on signals (`StopSignal`)
and resumes exactly; stats and the progress bar are hooks (`stats.py`), and everything
stage-specific is a `HookBase` too.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import YoloCompressError
from .distributed import all_reduce_max, barrier, get_rank, get_world_size, is_main, unwrap
from .ema import ModelEMA
from .hooks import EMAHook
from .signals import StopSignal
from .stats import ProgressHook, StatsHook
from .step import Criterion, TrainStep
from .trainer_base import HookBase, TrainerBase

__all__ = ["HookBase", "Trainer", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Global RNG states as tensors/ints/floats, so torch.load(weights_only=True) accepts them."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        n = min(len(state["cuda"]), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(state["cuda"][:n])


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)


class Trainer(TrainerBase):
    """Train `model` for `epochs` epochs over `train_loader`.

    Accumulation: each micro-batch's total loss is divided by `accumulate`; the optimizer steps
    after every `accumulate` micro-batches (windows aligned to the start of the epoch) and once more
    at the end of an epoch whose length is not a multiple -- that partial window is not re-weighted,
    so every image weighs the same. `max_iter` = epochs * ceil(len(loader) / accumulate).
    AMP (autocast + GradScaler) is on only when `amp` and the device is CUDA.
    A non-finite total loss raises YoloCompressError (epoch, step, offending terms) before its
    backward; checkpoints written by hooks at earlier epochs are left as they are.
    SIGINT/SIGTERM during `train()`: the running micro-batch finishes (under DDP the next one, so
    that all ranks stop at the same step), the optimizer steps on what was accumulated, hooks'
    `on_interrupt` run (CheckpointHook writes last.pt), the previous handlers are restored and
    KeyboardInterrupt is raised; a second signal aborts at once. `request_stop()` does the same
    from code.
    Seeding and resume: `train()` seeds random/NumPy/torch from `seed` unless `load_state_dict`
    was called (then the saved RNG states are restored). Every epoch the data's randomness is
    re-derived from (seed, epoch, rank): `set_epoch(epoch)` is called on the loader's sampler,
    batch sampler and dataset where they have it, and the loader's `generator` is re-seeded (this
    also fixes the DataLoader workers' seeds). A dataset that draws augmentation from its own RNG
    in the main process (workers == 0) must offer `set_epoch` for resumes to be exact. With that,
    resuming from an epoch-end last.pt is bit-exact on CPU; a mid-epoch (interrupt) checkpoint
    replays the epoch's first batches without training on them, and is exact when accumulate == 1
    (otherwise the interrupted window was stepped early).
    `model` may be DDP-wrapped (`wrap_ddp`); `module` is the plain model (saved, evaluated).
    Hooks the Trainer adds by itself: `stats` (StatsHook), a ProgressHook when `progress`, and an
    EMAHook when `ema` is given and `hooks` has none.
    """

    def __init__(self, model: nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer,
                 train_loader: Iterable, *, epochs: int, accumulate: int = 1,
                 device: torch.device | str = "cpu", amp: bool = False, grad_clip: float | None = None,
                 hooks: Sequence[HookBase] = (), ema: ModelEMA | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        if epochs < 1:
            raise YoloCompressError(f"Trainer needs epochs >= 1, got {epochs}")
        super().__init__(epochs)
        self.device = torch.device(device)
        self.train_step = TrainStep(model, criterion, optimizer, device=self.device,
                                    accumulate=accumulate, amp=amp, grad_clip=grad_clip)
        try:
            self.batches_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError as e:
            raise YoloCompressError("the training loader must have a length (map-style data)") from e
        if self.batches_per_epoch < 1:
            raise YoloCompressError("the training loader yields no batches (empty data set?)")
        self.module = unwrap(model)
        self.module.to(self.device)
        self.train_loader = train_loader
        self.ema, self.seed = ema, seed
        if ema is not None:
            ema.module.to(self.device)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accumulate)
        self.max_iter = epochs * self.steps_per_epoch
        self.batch_idx = 0        # micro-batch index within the epoch
        self.batch: Sequence[Any] = ()
        self.data_time = 0.0      # seconds the loader took to yield the current micro-batch
        self.step_skipped = False
        self._epoch_rng: dict | None = None
        self._pending_rng: dict | None = None
        self._resumed = False
        self._signal = StopSignal()
        self.stats = StatsHook()
        own: list[HookBase] = [self.stats, *([ProgressHook()] if progress else [])]
        if ema is not None and not any(isinstance(h, EMAHook) for h in hooks):
            own.append(EMAHook())
        self.register_hooks([*own, *hooks])

    # --- public state -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The trained model as given (maybe DDP-wrapped); `module` is the plain one."""
        return self.train_step.model

    @property
    def criterion(self) -> Criterion:
        return self.train_step.criterion

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.train_step.optimizer

    @property
    def accumulate(self) -> int:
        return self.train_step.accumulate

    @property
    def grad_clip(self) -> float | None:
        return self.train_step.grad_clip

    @property
    def amp(self) -> bool:
        return self.train_step.amp

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.train_step.scaler

    @scaler.setter
    def scaler(self, scaler: torch.amp.GradScaler) -> None:
        self.train_step.scaler = scaler

    @property
    def last_losses(self) -> dict[str, float]:
        """The logged loss terms of the latest micro-batch."""
        return self.train_step.last_losses

    @property
    def progress(self) -> float:
        """Fraction of optimizer steps done before the current one, in [0, 1]."""
        return min(1.0, self.iter / self.max_iter)

    @property
    def model_for_eval(self) -> nn.Module:
        """The EMA model when EMA is on, else the plain model."""
        return self.ema.module if self.ema is not None else self.module

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def stop_requested(self) -> bool:
        return self._signal.requested

    def request_stop(self) -> None:
        """Stop as after a SIGINT/SIGTERM: finish the micro-batch, step, save, raise."""
        self._signal.request()

    # --- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything an exact resume needs; loadable with torch.load(weights_only=True)."""
        epoch, done = self.position
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch, "epoch_batches": done, "iter": self.iter,
            "batches_per_epoch": self.batches_per_epoch,
            "storage": dict(self.storage), "stats": self.stats.state(),
            "rng": _rng_state(),
            "epoch_rng": self._epoch_rng if done else None,
            "hooks": self.hooks_state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["epoch_batches"])
        if epoch > self.epochs or (epoch == self.epochs and done):
            part = " and part of the next" if done else ""
            raise YoloCompressError(f"checkpoint has {epoch} epochs done{part} but this training has "
                                    f"only {self.epochs} epochs")
        if done and state["batches_per_epoch"] != self.batches_per_epoch:
            raise YoloCompressError(
                f"checkpoint was taken mid-epoch with {state['batches_per_epoch']} batches per epoch, "
                f"this loader gives {self.batches_per_epoch} (other data, batch size or world size)")
        saved_hooks = dict(state["hooks"])
        self.check_hooks_state(saved_hooks)
        if (state["ema"] is None) != (self.ema is None):
            raise YoloCompressError("checkpoint and trainer disagree on EMA (one has it, one not)")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():  # a disabled scaler saves {}
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.load_hooks_state_dict(saved_hooks)
        self.position, self.iter, self.epoch = (epoch, done), int(state["iter"]), epoch
        self.storage = dict(state["storage"])
        self.stats.load_state(state["stats"] if done else None)
        self._pending_rng, self._epoch_rng = state["rng"], state["epoch_rng"]
        self._resumed = True

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns `storage` (the last epoch's stats and metrics)."""
        self._signal.announce = is_main()
        with self._signal:
            if not self._resumed:
                seed_everything(self.seed)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            return super().train()

    def run_epoch(self) -> None:
        epoch, skip = self.position
        if skip:   # resuming mid-epoch: same data order and randomness as the interrupted run
            _set_rng_state(self._epoch_rng)
        else:
            if self._pending_rng is not None:
                _set_rng_state(self._pending_rng)
                self._pending_rng = None
            self._epoch_rng = _rng_state()
        self.call_hooks("before_epoch")
        self._seed_data(epoch)
        n = self.batches_per_epoch
        it = iter(self.train_loader)
        for _ in range(min(skip, n)):
            next(it)
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        b, pending = skip, False
        ddp = get_world_size() > 1
        while b < n:
            t0 = time.perf_counter()
            batch = self._fetch(it)
            self.data_time = time.perf_counter() - t0
            if batch is None:   # the loader ended early, or died on an interrupt
                if pending:
                    self._optimizer_step()
                    self.position = (epoch, b)
                if self.stop_requested:
                    self._interrupt()
                break
            self.batch_idx = b
            # under DDP a stop is agreed before backward, so that this micro-batch syncs
            stop = self._stop_agreed() if ddp else False
            b += 1
            try:
                self._micro_step(batch, sync=b % self.accumulate == 0 or b == n or stop)
            except RuntimeError:
                # a SIGTERM to the whole process group kills the DataLoader workers too, and
                # torch reports that from its SIGCHLD handler, possibly mid-backward
                if not self.stop_requested:
                    raise
                self._interrupt()   # state as of the last optimizer step (self.position)
            stop = stop or (not ddp and self.stop_requested)
            step = b % self.accumulate == 0 or b == n or stop
            pending = not step
            if step:
                self._optimizer_step()
                self.position = (epoch, b)
            self.call_hooks("after_step")
            if stop:
                self._interrupt()
        self.position = (epoch + 1, 0)

    def check_stop(self) -> None:
        if self._stop_agreed():
            self._interrupt()

    def _fetch(self, it) -> Sequence[Any] | None:
        try:
            return next(it)
        except StopIteration:
            return None
        except Exception:
            if self.stop_requested:   # Ctrl-C reaches DataLoader workers too; they exit, fetch fails
                return None
            raise

    def _micro_step(self, batch: Sequence[Any], sync: bool) -> None:
        """Forward + backward of one micro-batch; under DDP gradients are reduced only if `sync`."""
        self.batch = self._to_device(batch)
        self.call_hooks("before_step")
        where = (f"epoch {self.epoch + 1}/{self.epochs} after {self.iter} optimizer steps "
                 f"(micro-batch {self.batch_idx + 1}/{self.batches_per_epoch})")
        self.train_step.forward_backward(self.batch, sync=sync, where=where)
        self.call_hooks("after_backward")

    def _optimizer_step(self) -> None:
        self.train_step.unscale()
        self.call_hooks("before_optimizer_step")
        self.step_skipped = self.train_step.apply()
        self.call_hooks("after_optimizer_step")
        self.iter += 1

    def _to_device(self, batch: Sequence[Any]) -> list[Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not torch.is_tensor(batch[0]):
            raise YoloCompressError("a training batch must be (images, targets, ...) with images a "
                                    "tensor")
        images = batch[0].to(self.device, non_blocking=True)
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        targets = batch[1].to(self.device, non_blocking=True) if torch.is_tensor(batch[1]) else batch[1]
        return [images, targets, *batch[2:]]

    def _seed_data(self, epoch: int) -> None:
        loader = self.train_loader
        batch_sampler = getattr(loader, "batch_sampler", None)
        objs = (getattr(loader, "sampler", None), batch_sampler,
                getattr(batch_sampler, "sampler", None), getattr(loader, "dataset", None))
        done: set[int] = set()
        for obj in objs:
            if obj is not None and id(obj) not in done and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
                done.add(id(obj))
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(_epoch_seed(self.seed, epoch, get_rank()))

    # --- stopping -----------------------------------------------------------------------------
    def _stop_agreed(self) -> bool:
        """Whether to stop; under DDP every rank must agree, or one would wait for the others."""
        if get_world_size() == 1:
            return self.stop_requested
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        return bool(all_reduce_max(flag).item() > 0)

    def _interrupt(self) -> None:
        self.call_hooks("on_interrupt")
        barrier()
        raise KeyboardInterrupt(f"training interrupted in epoch {self.epoch + 1} after optimizer "
                                f"step {self.iter}")
