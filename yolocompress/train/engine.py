"""The one training loop. `Trainer` runs epochs of micro-batches with AMP, gradient accumulation,
DDP, NaN checks, signal handling and exact resume; everything stage-specific is a `HookBase`.

Loss rule: `criterion(model, batch)` returns a dict of scalar loss terms; the optimised total is
the sum of every term except a key named "loss" (a criterion's own reported sum, ignored so it is
not counted twice) -- unless "loss" is the only key, then it is the total. Logs show each term and
"loss" = the optimised total.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import YoloCompressError
from .distributed import all_reduce_max, barrier, get_rank, get_world_size, is_main, unwrap
from .ema import ModelEMA

__all__ = ["HookBase", "Trainer", "seed_everything"]

Criterion = Callable[[nn.Module, Sequence[Any]], "dict[str, torch.Tensor]"]


class HookBase:
    """A training hook: override any of the no-op methods below. Call order::

        before_train()
        for epoch in range(start_epoch, epochs):
            before_epoch()
            for batch in loader:                        # micro-batches
                trainer.batch = batch on the device, images float in [0, 1]
                before_step()                           # may replace trainer.batch (multi-scale, ...)
                losses = criterion(model, trainer.batch)
                backward(scaler_scale * total / accumulate)
                after_backward()                        # EVERY micro-batch: grads are partial sums
                                                        # and still multiplied by the AMP loss scale
                if window of `accumulate` micro-batches full, or epoch ends, or stop requested:
                    scaler.unscale_(optimizer)
                    before_optimizer_step()             # ONCE per step: grads are the true, unscaled,
                                                        # accumulated ones (DDP-averaged); add
                                                        # regularisers such as s*sign(gamma) here
                    clip grads; scaler.step(optimizer); scaler.update(); zero_grad()
                    after_optimizer_step()              # trainer.step_skipped: AMP found inf grads
                    trainer.iter += 1
            after_epoch()                               # trainer.storage has the epoch's stats
        after_train()                                   # also runs when training ends with an error
        on_interrupt()                                  # SIGINT/SIGTERM, after the step it interrupted

    During a step `trainer.iter` is its 0-based index. `trainer` is set when the hook is registered.
    Hooks run in ascending `priority` (stable): schedules 10, EMA 20, default 50, evaluation 60,
    logging 70, checkpoints 80 -- so logs and checkpoints see the epoch's metrics, and a
    checkpoint holds every hook's state as of the end of the epoch.
    """

    priority: int = 50
    trainer: "Trainer"

    def before_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def before_step(self) -> None: ...
    def after_backward(self) -> None: ...
    def before_optimizer_step(self) -> None: ...
    def after_optimizer_step(self) -> None: ...
    def after_epoch(self) -> None: ...
    def after_train(self) -> None: ...
    def on_interrupt(self) -> None: ...

    def state_dict(self) -> dict:
        """What this hook needs for an exact resume (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


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


class Trainer:
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
    KeyboardInterrupt is raised; a second signal aborts at once.
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
    """

    def __init__(self, model: nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer,
                 train_loader: Iterable, *, epochs: int, accumulate: int = 1,
                 device: torch.device | str = "cpu", amp: bool = False, grad_clip: float | None = None,
                 hooks: Sequence[HookBase] = (), ema: ModelEMA | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        if epochs < 1 or accumulate < 1:
            raise YoloCompressError(f"Trainer needs epochs >= 1 and accumulate >= 1, got {epochs}, "
                                    f"{accumulate}")
        if grad_clip is not None and grad_clip <= 0:
            raise YoloCompressError(f"grad_clip must be > 0 or None, got {grad_clip}")
        try:
            self.batches_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError as e:
            raise YoloCompressError("the training loader must have a length (map-style data)") from e
        if self.batches_per_epoch < 1:
            raise YoloCompressError("the training loader yields no batches (empty data set?)")
        self.device = torch.device(device)
        self.model, self.module = model, unwrap(model)
        self.module.to(self.device)
        self.criterion, self.optimizer, self.train_loader = criterion, optimizer, train_loader
        self.epochs, self.accumulate, self.grad_clip = epochs, accumulate, grad_clip
        self.amp = bool(amp) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda" if self.amp else "cpu", enabled=self.amp)
        self.ema, self.seed, self.show_progress = ema, seed, progress
        if ema is not None:
            ema.module.to(self.device)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accumulate)
        self.max_iter = epochs * self.steps_per_epoch
        self.epoch = 0            # 0-based index of the current epoch
        self.iter = 0             # 0-based index of the current optimizer step = steps done before it
        self.batch_idx = 0        # micro-batch index within the epoch
        self.batch: Sequence[Any] = ()
        self.last_losses: dict[str, float] = {}
        self.storage: dict[str, Any] = {}
        self.step_skipped = False
        self._next = (0, 0)       # resume position: (epoch, micro-batches of it already done)
        self._stats = self._fresh_stats()
        self._epoch_rng: dict | None = None
        self._pending_rng: dict | None = None
        self._resumed = False
        self._stop = False
        self.hooks: list[HookBase] = []
        if ema is not None:
            from .hooks import EMAHook  # hooks.py builds on this module
            if not any(isinstance(h, EMAHook) for h in hooks):
                hooks = [EMAHook(), *hooks]
        self.register_hooks(hooks)

    # --- public state -------------------------------------------------------------------------
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

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        for h in hooks:
            if not isinstance(h, HookBase):
                raise YoloCompressError(f"{type(h).__name__} is not a HookBase")
            h.trainer = weakref.proxy(self)
            self.hooks.append(h)
        self.hooks.sort(key=lambda h: h.priority)

    def _call(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name)()

    def _hook_keys(self) -> list[str]:
        keys, seen = [], {}
        for h in self.hooks:
            name = type(h).__name__
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return keys

    # --- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything an exact resume needs; loadable with torch.load(weights_only=True)."""
        epoch, done = self._next
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch, "epoch_batches": done, "iter": self.iter,
            "batches_per_epoch": self.batches_per_epoch,
            "storage": dict(self.storage), "stats": dict(self._stats, sums=dict(self._stats["sums"])),
            "rng": _rng_state(),
            "epoch_rng": self._epoch_rng if done else None,
            "hooks": {k: sd for k, h in zip(self._hook_keys(), self.hooks) if (sd := h.state_dict())},
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
        keys = self._hook_keys()
        unknown = [k for k in saved_hooks if k not in keys]
        if unknown:
            raise YoloCompressError(f"checkpoint has state for hook(s) {', '.join(unknown)} that this "
                                    f"training does not have (hooks: {', '.join(keys) or 'none'})")
        if (state["ema"] is None) != (self.ema is None):
            raise YoloCompressError("checkpoint and trainer disagree on EMA (one has it, one not)")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():  # a disabled scaler saves {}
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for k, h in zip(keys, self.hooks):
            if k in saved_hooks:
                h.load_state_dict(saved_hooks[k])
        self._next, self.iter, self.epoch = (epoch, done), int(state["iter"]), epoch
        self.storage = dict(state["storage"])
        self._stats = dict(state["stats"], sums=dict(state["stats"]["sums"])) if done \
            else self._fresh_stats()
        self._pending_rng, self._epoch_rng = state["rng"], state["epoch_rng"]
        self._resumed = True

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns `storage` (the last epoch's stats and metrics)."""
        restore = self._install_signal_handlers()
        try:
            if not self._resumed:
                seed_everything(self.seed)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            self._call("before_train")
            for epoch in range(self._next[0], self.epochs):
                self.epoch = epoch
                self._run_epoch()
                self._call("after_epoch")
                if epoch + 1 < self.epochs and self._stop_agreed():
                    self._interrupt()
            return self.storage
        finally:
            try:
                self._call("after_train")
            finally:
                restore()

    def _run_epoch(self) -> None:
        epoch, skip = self._next
        if skip:   # resuming mid-epoch: same data order and randomness as the interrupted run
            _set_rng_state(self._epoch_rng)
        else:
            if self._pending_rng is not None:
                _set_rng_state(self._pending_rng)
                self._pending_rng = None
            self._epoch_rng, self._stats = _rng_state(), self._fresh_stats()
        self._call("before_epoch")
        self._seed_data(epoch)
        n = self.batches_per_epoch
        it = iter(self.train_loader)
        for _ in range(min(skip, n)):
            next(it)
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        bar = tqdm(total=n, initial=skip, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                   dynamic_ncols=True, disable=None if self.show_progress and is_main() else True)
        b, pending, t_start = skip, False, time.perf_counter()
        ddp = get_world_size() > 1
        try:
            while b < n:
                t0 = time.perf_counter()
                batch = self._fetch(it)
                self._stats["wait"] += time.perf_counter() - t0
                if batch is None:   # the loader ended early, or died on an interrupt
                    if pending:
                        self._optimizer_step()
                        self._next = (epoch, b)
                    if self._stop:
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
                    if not self._stop:
                        raise
                    self._interrupt()   # state as of the last optimizer step (self._next)
                stop = stop or (not ddp and self._stop)
                step = b % self.accumulate == 0 or b == n or stop
                pending = not step
                if step:
                    self._optimizer_step()
                    self._next = (epoch, b)
                self._stats["time"] = self._stats["prev_time"] + time.perf_counter() - t_start
                bar.update(1)
                bar.set_postfix(self._postfix(), refresh=False)
                if stop:
                    self._interrupt()
        finally:
            bar.close()
        self._next = (epoch + 1, 0)
        self._epoch_summary()

    def _fetch(self, it) -> Sequence[Any] | None:
        try:
            return next(it)
        except StopIteration:
            return None
        except Exception:
            if self._stop:   # Ctrl-C reaches DataLoader workers too; they exit and the fetch fails
                return None
            raise

    def _micro_step(self, batch: Sequence[Any], sync: bool) -> None:
        """Forward + backward of one micro-batch; under DDP gradients are reduced only if `sync`."""
        self.batch = self._to_device(batch)
        self._call("before_step")
        no_sync = isinstance(self.model, DistributedDataParallel) and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, enabled=self.amp):
                terms = self.criterion(self.model, self.batch)
            total = self._total(terms)
            self.scaler.scale(total / self.accumulate).backward()
        self._call("after_backward")
        self._stats["images"] += int(self.batch[0].shape[0])

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        self._call("before_optimizer_step")
        if self.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        enabled = self.scaler.is_enabled()
        scale = self.scaler.get_scale() if enabled else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_skipped = enabled and self.scaler.get_scale() < scale
        self.optimizer.zero_grad(set_to_none=True)
        self._call("after_optimizer_step")
        self.iter += 1

    def _to_device(self, batch: Sequence[Any]) -> list[Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not torch.is_tensor(batch[0]):
            raise YoloCompressError("a training batch must be (images, targets, ...) with images a "
                                    "tensor")
        images = batch[0].to(self.device, non_blocking=True)
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        targets = batch[1].to(self.device, non_blocking=True) if torch.is_tensor(batch[1]) else batch[1]
        return [images, targets, *batch[2:]]

    def _total(self, terms: Any) -> torch.Tensor:
        if not isinstance(terms, dict) or not terms:
            raise YoloCompressError(f"the criterion must return a non-empty dict of loss terms, got "
                                    f"{type(terms).__name__}")
        for k, v in terms.items():
            if not torch.is_tensor(v) or v.numel() != 1:
                raise YoloCompressError(f"loss term '{k}' must be a scalar tensor, got "
                                        f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
        parts = {k: v for k, v in terms.items() if k != "loss"} or {"loss": terms["loss"]}
        total = torch.stack([v.reshape(()).float() for v in parts.values()]).sum()
        values = torch.stack([v.detach().reshape(()).float() for v in parts.values()]
                             + [total.detach()]).cpu().tolist()
        self.last_losses = dict(zip([*parts, "loss"], values))
        if not math.isfinite(values[-1]):
            bad = [f"{k}={v}" for k, v in zip(parts, values) if not math.isfinite(v)] \
                or [f"sum={values[-1]} (terms overflow)"]
            raise YoloCompressError(
                f"non-finite loss in epoch {self.epoch + 1}/{self.epochs} after {self.iter} optimizer "
                f"steps (micro-batch {self.batch_idx + 1}/{self.batches_per_epoch}): "
                f"{', '.join(bad)}")
        for k, v in self.last_losses.items():
            self._stats["sums"][k] = self._stats["sums"].get(k, 0.0) + v
        self._stats["count"] += 1
        return total

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

    # --- stats, progress ----------------------------------------------------------------------
    @staticmethod
    def _fresh_stats() -> dict:
        return {"sums": {}, "count": 0, "images": 0, "wait": 0.0, "time": 0.0, "prev_time": 0.0}

    def _postfix(self) -> dict[str, str]:
        s = self._stats
        post = {k: f"{v / max(s['count'], 1):.4g}" for k, v in s["sums"].items()}
        post["lr"] = f"{self.lr:.3g}"
        post["img/s"] = f"{s['images'] / max(s['time'], 1e-9):.1f}"
        return post

    def _epoch_summary(self) -> None:
        s = self._stats
        for k, v in s["sums"].items():
            self.storage[f"train/{k}"] = v / max(s["count"], 1)
        self.storage["lr"] = self.lr
        self.storage["images_per_s"] = s["images"] / max(s["time"], 1e-9)
        self.storage["data_wait_share"] = min(1.0, s["wait"] / max(s["time"], 1e-9))

    # --- signals ------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        self._stop = False
        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:   # a forked DataLoader worker: the trainer decides and
                return                 # shuts the workers down when it stops
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            if is_main():
                tqdm.write(f"{signal.Signals(signum).name}: stopping after this step and saving "
                           f"last.pt (send again to abort at once)")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, signal.SIG_DFL if h is None else h)
        return restore

    def _stop_agreed(self) -> bool:
        """Whether to stop; under DDP every rank must agree, or one would wait for the others."""
        if get_world_size() == 1:
            return self._stop
        flag = torch.tensor([float(self._stop)], device=self.device)
        return bool(all_reduce_max(flag).item() > 0)

    def _interrupt(self) -> None:
        self._stats["prev_time"] = self._stats["time"]
        self._call("on_interrupt")
        barrier()
        raise KeyboardInterrupt(f"training interrupted in epoch {self.epoch + 1} after optimizer "
                                f"step {self.iter}")
