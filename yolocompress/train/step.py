"""One optimizer step built from micro-batches: forward + backward per micro-batch with gradient
accumulation, AMP (autocast + GradScaler) and DDP `no_sync`, then unscale / clip / step.

Loss rule (`sum_terms`): `criterion(model, batch)` returns a dict of scalar loss terms; the
optimised total is the sum of every term except a key named "loss" (a criterion's own reported
sum, ignored so it is not counted twice) -- unless "loss" is the only key, then it is the total.
The logged values are each term and "loss" = the optimised total.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import YoloCompressError

__all__ = ["Criterion", "TrainStep", "sum_terms"]

Criterion = Callable[[nn.Module, Sequence[Any]], "dict[str, torch.Tensor]"]


def sum_terms(terms: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """(total to optimise, {term: value, ..., "loss": total}) by the loss rule above."""
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
                         + [total.detach()]).cpu().tolist()   # one device sync for all terms
    return total, dict(zip([*parts, "loss"], values))


class TrainStep:
    """Micro-batch forward/backward and the optimizer step of `model` (plain or DDP-wrapped).

    `forward_backward(batch, sync, where)` backpropagates total / `accumulate` (times the AMP loss
    scale), so the gradients of `accumulate` micro-batches of equal size sum to those of their mean;
    under DDP gradients are all-reduced only when `sync` (the last micro-batch of a window). A
    non-finite total raises YoloCompressError before its backward, naming `where` and the
    offending terms. `unscale()` then `apply()` make the step: true gradients between the two (for
    hooks), clipping to `grad_clip`, scaler.step, scaler.update, zero_grad. AMP is on only when
    `amp` and the device is CUDA; `scaler` is a GradScaler that is disabled otherwise.
    """

    def __init__(self, model: nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, accumulate: int = 1, amp: bool = False,
                 grad_clip: float | None = None) -> None:
        if accumulate < 1:
            raise YoloCompressError(f"accumulate must be >= 1, got {accumulate}")
        if grad_clip is not None and grad_clip <= 0:
            raise YoloCompressError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.device, self.accumulate, self.grad_clip = device, accumulate, grad_clip
        self.amp = bool(amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda" if self.amp else "cpu", enabled=self.amp)
        self.last_losses: dict[str, float] = {}

    def forward_backward(self, batch: Sequence[Any], sync: bool = True, where: str = "") -> dict:
        """Loss terms and backward of one micro-batch; returns (and keeps) the logged values."""
        no_sync = isinstance(self.model, DistributedDataParallel) and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, enabled=self.amp):
                terms = self.criterion(self.model, batch)
            total, self.last_losses = sum_terms(terms)
            if not math.isfinite(self.last_losses["loss"]):
                raise YoloCompressError(f"non-finite loss{' in ' + where if where else ''}: "
                                        f"{', '.join(_bad_terms(self.last_losses))}")
            self.scaler.scale(total / self.accumulate).backward()
        return self.last_losses

    def unscale(self) -> None:
        """Divide the accumulated gradients by the AMP loss scale (a no-op without AMP)."""
        self.scaler.unscale_(self.optimizer)

    def apply(self) -> bool:
        """Clip, step and zero the gradients; True when AMP skipped the step (inf/nan gradients)."""
        if self.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        enabled = self.scaler.is_enabled()
        scale = self.scaler.get_scale() if enabled else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return enabled and self.scaler.get_scale() < scale


def _bad_terms(losses: dict[str, float]) -> list[str]:
    terms = {k: v for k, v in losses.items() if k != "loss"} or losses
    return [f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)] \
        or [f"sum={losses['loss']} (terms overflow)"]
