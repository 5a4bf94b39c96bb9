"""Optimizer with Darknet's decay rule, and the gradient-accumulation factor for a nominal batch.

Three parameter groups, named in `group["name"]`: "decay" (conv/linear weights, weight decay on),
"bn" (normalisation-layer weights) and "bias" (every bias and any other 1-D parameter), both without
decay: Darknet decays conv weights only. A parametrized tensor (torch.nn.utils.parametrize, e.g. a
conv weight tied to a codebook: compress/share_finetune.py) is grouped as the tensor it stands
for, whatever the shape of the parameters it is made of. SGD uses classic momentum (nesterov
off); Adam/AdamW use `momentum` as beta1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from ..errors import YoloCompressError
from .distributed import unwrap

__all__ = ["OPTIMIZERS", "param_groups", "build_optimizer", "accumulate_steps"]

OPTIMIZERS = ("sgd", "adam", "adamw")


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split into "decay", "bn" and "bias" (each parameter exactly once)."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "bn": [], "bias": []}
    norm_types = (_NormBase, nn.GroupNorm, nn.LayerNorm)
    for module in unwrap(model).modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue        # its parameters are grouped with the module they parametrize
        for name, p, ndim in _own_parameters(module):
            if not p.requires_grad:
                continue
            if name == "bias" or (ndim <= 1 and not isinstance(module, norm_types)):
                groups["bias"].append(p)
            elif isinstance(module, norm_types):
                groups["bn"].append(p)
            else:
                groups["decay"].append(p)
    return groups


def _own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter, int]]:
    """(name, parameter, ndim of the tensor it makes) of a module's own parameters; the
    parameters behind a parametrized tensor get that tensor's name and ndim."""
    own = [(name, p, p.ndim) for name, p in module.named_parameters(recurse=False)]
    if parametrize.is_parametrized(module):
        with torch.no_grad():
            for name, plist in module.parametrizations.items():
                ndim = getattr(module, name).ndim
                own += [(name, p, ndim) for p in plist.parameters(recurse=False)]
    return own


def build_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.0013, momentum: float = 0.949,
                    weight_decay: float = 0.0005,
                    lr_mult: tuple[Sequence[nn.Parameter], float] | None = None
                    ) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over `param_groups(model)`; decay applies to the "decay" group only.
    `lr_mult` = (parameters, m): those parameters leave their group for a group of their own,
    "<group>_lr_x<m>", with lr * m and their group's decay (the LR schedule scales it alike)."""
    if name not in OPTIMIZERS:
        raise YoloCompressError(f"unknown optimizer '{name}' (one of {', '.join(OPTIMIZERS)})")
    if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
        raise YoloCompressError(f"optimizer needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; "
                                f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
    boosted, mult = ({id(p) for p in lr_mult[0]}, lr_mult[1]) if lr_mult else (set(), 1.0)
    groups = []
    for key, params in param_groups(model).items():
        decay = weight_decay if key == "decay" else 0.0
        plain = [p for p in params if id(p) not in boosted]
        extra = [p for p in params if id(p) in boosted]
        if plain:
            groups.append({"params": plain, "name": key, "weight_decay": decay, "lr": lr})
        if extra:
            groups.append({"params": extra, "name": f"{key}_lr_x{mult:g}", "weight_decay": decay,
                           "lr": lr * mult})
    if not groups:
        raise YoloCompressError("the model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, betas=(momentum, 0.999))


def accumulate_steps(nominal_batch: int, batch_size: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer step so one step sees about `nominal_batch` images in all:
    round(nominal / (batch_size * world_size)), at least 1."""
    for label, v in (("nominal_batch", nominal_batch), ("batch_size", batch_size),
                     ("world_size", world_size)):
        if not isinstance(v, int) or v < 1:
            raise YoloCompressError(f"{label} must be a positive integer, got {v!r}")
    return max(1, math.floor(nominal_batch / (batch_size * world_size) + 0.5))
