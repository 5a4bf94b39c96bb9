"""The loop skeleton: `HookBase` (the hook interface and its call order) and `TrainerBase` (loop
state, hook registration and calls, keyed hook state for checkpoints). No torch, no I/O: what a
micro-batch is and how it is trained belongs to the subclass (`engine.Trainer`).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from ..errors import YoloCompressError

__all__ = ["HookBase", "TrainerBase"]


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
                after_step()                            # EVERY micro-batch that completed, after its
                                                        # optimizer step if it had one
            after_epoch()                               # trainer.storage has the epoch's stats
        after_train()                                   # also runs when training ends with an error
        on_interrupt()                                  # SIGINT/SIGTERM, after the step it interrupted

    During a step `trainer.iter` is its 0-based index. `trainer` is set when the hook is registered.
    Hooks run in ascending `priority` (stable): the trainer's own stats and progress bar 0, schedules
    10, EMA 20, default 50, evaluation 60, logging 70, checkpoints 80 -- so every hook's
    `after_epoch` sees the epoch's stats, logs and checkpoints see the epoch's metrics, and a
    checkpoint holds every hook's state as of the end of the epoch.
    """

    priority: int = 50
    trainer: Any   # a weak proxy of the TrainerBase that registered the hook

    def before_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def before_step(self) -> None: ...
    def after_backward(self) -> None: ...
    def before_optimizer_step(self) -> None: ...
    def after_optimizer_step(self) -> None: ...
    def after_step(self) -> None: ...
    def after_epoch(self) -> None: ...
    def after_train(self) -> None: ...
    def on_interrupt(self) -> None: ...

    def state_dict(self) -> dict:
        """What this hook needs for an exact resume (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainerBase:
    """Epochs of `run_epoch()` with the hooks called around them (see HookBase for the order).

    Loop state: `epochs`, `epoch` (0-based index of the current epoch), `iter` (0-based index of the
    current optimizer step = steps done before it), `storage` (the last epoch's stats and metrics)
    and `position` = (epoch, micro-batches of it already stepped on): where a resume from a
    checkpoint taken now continues. A subclass implements `run_epoch` (which advances `iter` and
    `position`) and may override `check_stop`, called between epochs after `after_epoch`.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.epoch = 0
        self.iter = 0
        self.storage: dict[str, Any] = {}
        self.position = (0, 0)
        self.hooks: list[HookBase] = []

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        for h in hooks:
            if not isinstance(h, HookBase):
                raise YoloCompressError(f"{type(h).__name__} is not a HookBase")
            h.trainer = weakref.proxy(self)
            self.hooks.append(h)
        self.hooks.sort(key=lambda h: h.priority)

    def call_hooks(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name)()

    def train(self) -> dict[str, Any]:
        """Run the epochs from `position` on; returns `storage`."""
        try:
            self.call_hooks("before_train")
            for epoch in range(self.position[0], self.epochs):
                self.epoch = epoch
                self.run_epoch()
                self.call_hooks("after_epoch")
                if epoch + 1 < self.epochs:
                    self.check_stop()
            return self.storage
        finally:
            self.call_hooks("after_train")

    def run_epoch(self) -> None:
        raise NotImplementedError

    def check_stop(self) -> None:
        """Between epochs: end the training here if asked to (by raising)."""

    # --- keyed hook state ---------------------------------------------------------------------
    def hook_keys(self) -> list[str]:
        """One key per hook: its class name, `Name#2`, `Name#3`, ... for repeated classes."""
        keys, seen = [], {}
        for h in self.hooks:
            name = type(h).__name__
            seen[name] = seen.get(name, 0) + 1
            keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        return keys

    def hooks_state_dict(self) -> dict[str, dict]:
        """The non-empty `state_dict()` of every hook, by key."""
        return {k: sd for k, h in zip(self.hook_keys(), self.hooks) if (sd := h.state_dict())}

    def check_hooks_state(self, saved: dict[str, dict]) -> None:
        """Error if `saved` has state for a hook this trainer does not have."""
        keys = self.hook_keys()
        unknown = [k for k in saved if k not in keys]
        if unknown:
            raise YoloCompressError(f"checkpoint has state for hook(s) {', '.join(unknown)} that this "
                                    f"training does not have (hooks: {', '.join(keys) or 'none'})")

    def load_hooks_state_dict(self, saved: dict[str, dict]) -> None:
        self.check_hooks_state(saved)
        for k, h in zip(self.hook_keys(), self.hooks):
            if k in saved:
                h.load_state_dict(saved[k])
