"""Exponential moving average of a model's weights and floating buffers (YOLOv5-style ramped decay).

After the n-th update, d_n = decay * (1 - exp(-n / tau)) and ema = d_n * ema + (1 - d_n) * model for
every floating state_dict entry (BN running stats included); integer buffers are copied.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..errors import YoloCompressError
from .distributed import unwrap

__all__ = ["ModelEMA"]


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        if not 0 < decay < 1 or tau <= 0:
            raise YoloCompressError(f"EMA needs 0 < decay < 1 and tau > 0, got decay={decay}, tau={tau}")
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def current_decay(self) -> float:
        """The decay the latest update used, d_n with n = `updates`."""
        return self.decay * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = unwrap(model).state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].detach(), alpha=1.0 - d)
            else:
                v.copy_(src[k])

    def state_dict(self) -> dict:
        return {"state_dict": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])
        self.decay, self.tau = float(state["decay"]), float(state["tau"])
