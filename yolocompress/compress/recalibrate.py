"""Passes over a fixed calibration subset of the training split, for pruning decisions.

    calib = Calibration.from_records(train, n, img_size, letterbox)   # loaded once, no augmentation
    recalibrate_bn(model, calib)          # BN running statistics re-estimated (cumulative average)
    calib_loss(model, calib)              # mean detection loss, eval mode: a candidate's score
    gamma_gradients(model, calib, convs)  # sum over batches of |gamma * dL/dgamma| (BN-Taylor)

The subset is deterministic: n records evenly spaced over the split in its order (no random draw),
letterboxed or stretched as evaluation does, in batches of `batch_size` kept in memory as uint8.
Recalibration resets every BatchNorm's running mean / var, sets momentum=None (PyTorch's
cumulative moving average: after k batches the running statistics are the mean of the k batch
statistics) and forwards the subset in train mode without gradient; momentum and the model's
mode are restored afterwards. A sparse-trained or pruned model's stored statistics lag its
weights (and pruning changes a reader's input distribution), so every score "right after
pruning" is taken after this (DESIGN.md, EagleEye's adaptive BN, NNCF's BN adaptation).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.dataset import DetectionDataset, collate
from ..data.records import Record
from ..errors import YoloCompressError
from ..train.loss import YoloLoss

__all__ = ["Calibration", "recalibrate_bn", "calib_loss", "gamma_gradients"]


@dataclass(frozen=True)
class Calibration:
    """Batches of (uint8 images (B, 3, H, W), targets (n, 6)) of a fixed subset, and the records
    they were read from (in batch order)."""
    batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    records: tuple[Record, ...] = ()

    @classmethod
    def from_records(cls, records: Sequence[Record], n: int, img_size: int, letterbox: bool,
                     batch_size: int = 16) -> Calibration:
        if n < 1:
            raise YoloCompressError(f"calibration needs at least one image, got n={n}")
        if not records:
            raise YoloCompressError("calibration: the training split has no images")
        idx = np.unique(np.linspace(0, len(records) - 1, min(n, len(records))).round().astype(int))
        subset = tuple(records[i] for i in idx)
        ds = DetectionDataset(list(subset), img_size, augment=None, letterbox=letterbox)
        batches = []
        for start in range(0, len(ds), batch_size):
            images, targets, _ = collate([ds[i] for i in range(start, min(len(ds),
                                                                          start + batch_size))])
            batches.append((images, targets))
        return cls(tuple(batches), subset)

    @property
    def images(self) -> int:
        return sum(b[0].shape[0] for b in self.batches)

    def head(self, n: int) -> Calibration:
        """The first batches holding at least min(n, images) images (the same subset order)."""
        out, count = [], 0
        for b in self.batches:
            if count >= n:
                break
            out.append(b)
            count += b[0].shape[0]
        return Calibration(tuple(out), self.records[:count])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _inputs(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device).float().div_(255)


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, calib: Calibration) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics over `calib` in place; returns model."""
    bns = _bns(model)
    if not bns:
        return model
    was_training, momenta = model.training, [bn.momentum for bn in bns]
    device = _device(model)
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for images, _ in calib.batches:
            model(_inputs(images, device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return model


@torch.no_grad()
def calib_loss(model: nn.Module, calib: Calibration) -> float:
    """Mean detection loss (box + obj + cls, YoloLoss) over `calib`'s batches, in eval mode."""
    was_training, device = model.training, _device(model)
    loss = YoloLoss(model.heads)
    model.eval()
    total = 0.0
    for images, targets in calib.batches:
        x = _inputs(images, device)
        total += float(loss(model(x), targets, x.shape[-2:])["loss"]) * images.shape[0]
    model.train(was_training)
    return total / calib.images


def gamma_gradients(model: nn.Module, calib: Calibration, convs: Iterable[int]
                    ) -> dict[int, np.ndarray]:
    """{conv: sum over `calib`'s batches of |gamma * dL/dgamma|} (first-order Taylor estimate of
    the loss change from removing each channel, Molchanov et al. 2019), the model in eval mode so
    its running statistics stay as they are; parameters' .grad are left as they were."""
    convs = list(convs)
    layers = model.layers
    for c in convs:
        if getattr(layers[c], "bn", None) is None:
            raise YoloCompressError(f"BN-Taylor: conv {c} has no BatchNorm")
    gammas = [layers[c].bn.weight for c in convs]
    was_training, device = model.training, _device(model)
    loss = YoloLoss(model.heads)
    model.eval()
    acc = [np.zeros(g.numel()) for g in gammas]
    try:
        for images, targets in calib.batches:
            x = _inputs(images, device)
            with torch.enable_grad():
                grads = torch.autograd.grad(loss(model(x), targets, x.shape[-2:])["loss"],
                                            gammas, allow_unused=True)
            for a, g, d in zip(acc, gammas, grads):
                if d is not None:
                    a += (g.detach() * d).abs().double().cpu().numpy()
    finally:
        model.train(was_training)
    return dict(zip(convs, acc))
