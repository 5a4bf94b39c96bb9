"""Least-squares reconstruction of a pruned model's convs from its unpruned reference.

    records = reconstruct(reference, pruned, keep, calib)

For each conv of `pruned` in layer order (groups = 1), the weights (and an intercept) are
refitted so that, on `calib`'s images, the conv's output from the pruned model's own input (the
earlier convs already refitted) matches the reference conv's output on the channels it kept:
ridge regression over im2col rows, ROWS_PER_IMAGE evenly spaced output positions per image (He et
al. 2017 / ThiNet's feature-map reconstruction, sequential, graph-agnostic: no channel map is
needed, only the kept output channels). The targets are pre-BN, so with BatchNorm the intercept
goes into the running mean; without, into the bias. A fit is kept only where it lowers the
layer's error on the rows (by MIN_GAIN of the target's variance). Both models run in eval mode:
the reference's running statistics should be current (recalibrate it first); every BatchNorm of
`pruned` takes the reference's statistics of its kept channels. `keep`: {layer index: kept output channels} (compress.prune's
keep; a conv not in it keeps all). Returns per conv {layer, features, rows, error_before,
error_after, refitted} with errors relative to the target's variance.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import YoloCompressError
from ..models.darknet import Darknet
from ..models.layers import ConvLayer, ReadsOutputs
from .recalibrate import Calibration, _inputs

__all__ = ["ROWS_PER_IMAGE", "RIDGE", "reconstruct"]

ROWS_PER_IMAGE = 256      # output positions per image a conv's fit reads (evenly spaced)
RIDGE = 1e-3              # ridge weight, relative to the mean diagonal of the input Gram matrix
MIN_GAIN = 1e-6           # a fit must lower the relative error by this much (rounding aside)


def _positions(length: int) -> torch.Tensor:
    return torch.from_numpy(np.unique(np.linspace(0, length - 1, min(ROWS_PER_IMAGE, length))
                                      .round().astype(np.int64)))


def _rows(conv: torch.nn.Conv2d, x: torch.Tensor, y: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(im2col rows of x with a ones column (n, F + 1), target rows of y (n, C)) at the sampled
    output positions of every image."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)   # B, F, L
    y = y.flatten(2)                                                                 # B, C, L
    if cols.shape[-1] != y.shape[-1]:
        raise YoloCompressError(f"reconstruct: {cols.shape[-1]} im2col positions against "
                                f"{y.shape[-1]} target positions")
    pos = _positions(y.shape[-1]).to(y.device)
    cols, y = cols[..., pos].transpose(1, 2), y[..., pos].transpose(1, 2)
    cols = cols.reshape(-1, cols.shape[-1]).double()
    return torch.cat([cols, cols.new_ones(len(cols), 1)], 1), \
        y.reshape(-1, y.shape[-1]).double()


def _error(w: torch.Tensor, gram, cross, yy: torch.Tensor) -> float:
    """sum over rows of |y - x w|^2, from the accumulated x'x, x'y and y'y (trace)."""
    return float(yy - 2 * (w * cross).sum() + (w * (gram @ w)).sum())


def _fit_layer(layer: ConvLayer, sel: torch.Tensor, inputs: Sequence[torch.Tensor],
               targets: Sequence[torch.Tensor], index: int) -> dict:
    """Refit `layer`'s conv in place on (its inputs, the reference conv's outputs on the kept
    channels `sel`), batch by batch; the record of the fit."""
    conv = layer.conv
    f, dev = conv.weight[0].numel(), conv.weight.device
    kw = dict(dtype=torch.float64, device=dev)
    gram, cross = torch.zeros(f + 1, f + 1, **kw), torch.zeros(f + 1, len(sel), **kw)
    yy, ysum, rows = torch.zeros((), **kw), torch.zeros(len(sel), **kw), 0
    for inp, target in zip(inputs, targets):
        a, y = _rows(conv, inp, target)
        gram += a.T @ a
        cross += a.T @ y
        yy += (y * y).sum()
        ysum += y.sum(0)
        rows += len(y)
    old = torch.cat([conv.weight.reshape(len(sel), f).T.double(),
                     (conv.bias.double() if conv.bias is not None
                      else torch.zeros(len(sel), **kw))[None]], 0)
    var = float(yy - (ysum * ysum).sum() / rows) or 1.0
    ridge = RIDGE * float(gram.diagonal()[:f].mean()) * torch.ones(f + 1, **kw)
    ridge[-1] = 0.0                        # the intercept is not shrunk
    w = torch.linalg.solve(gram + torch.diag(ridge), cross)
    before, after = _error(old, gram, cross, yy) / var, _error(w, gram, cross, yy) / var
    refit = after < before - MIN_GAIN
    if refit:
        conv.weight.copy_(w[:f].T.reshape_as(conv.weight).to(conv.weight.dtype))
        if layer.bn_enabled:
            # y = W'x + b fits the target, the BN reads W'x: its mean moves by -b
            layer.bn.running_mean.sub_(w[f].to(layer.bn.running_mean.dtype))
        else:
            conv.bias.copy_(w[f].to(conv.bias.dtype))
    return {"layer": index, "features": f, "rows": rows, "error_before": before,
            "error_after": after if refit else before, "refitted": refit}


class _Streams:
    """One model run layer by layer over a list of batches: per batch the previous layer's
    output and the saved outputs still to be read (freed after their last reader)."""

    def __init__(self, model: Darknet, xs: Sequence[torch.Tensor]):
        self.model, self.prev = model, list(xs)
        n = len(model.layers)
        self.saved = [[None] * n for _ in xs]
        last: dict[int, int] = {}             # saved output -> the last layer reading it
        for i, (layer, srcs) in enumerate(zip(model.layers, model.sources)):
            if isinstance(layer, ReadsOutputs):
                for j in srcs:
                    last[j] = max(last.get(j, -1), i)
        self.last = last
        self.free = {i: [j for j, k in last.items() if k == i] for i in range(n)}

    def step(self, i: int) -> None:
        for b, (prev, saved) in enumerate(zip(self.prev, self.saved)):
            y = self.model.run_layer(i, prev, saved)
            if i in self.last:
                saved[i] = y
            for j in self.free[i]:
                saved[j] = None
            self.prev[b] = y


def _kept(keep: Mapping[int, Sequence[int]], i: int, channels: int) -> torch.Tensor:
    return torch.as_tensor(np.asarray(keep[i] if i in keep else range(channels), dtype=np.int64))


@torch.no_grad()
def reconstruct(reference: Darknet, pruned: Darknet, keep: Mapping[int, Sequence[int]],
                calib: Calibration, progress: bool = True) -> list[dict]:
    """Refit `pruned`'s convs in place to the reference's outputs (module docstring). Both
    models run layer by layer over all of `calib` at once (one forward each): memory holds the
    batches' activations that later layers still read."""
    if len(reference.layers) != len(pruned.layers):
        raise YoloCompressError(f"reconstruct: the pruned model has {len(pruned.layers)} layers, "
                                f"its reference {len(reference.layers)}")
    was = reference.training, pruned.training
    reference.eval()
    pruned.eval()
    sels = {}
    for i, (ref, new) in enumerate(zip(reference.layers, pruned.layers)):
        if isinstance(new, ConvLayer):
            sels[i] = _kept(keep, i, ref.conv.out_channels)
            if len(sels[i]) != new.conv.out_channels:
                raise YoloCompressError(f"reconstruct: layer {i} keeps {len(sels[i])} channels "
                                        f"but the pruned conv has {new.conv.out_channels}")
    records = []
    try:
        for i, sel in sels.items():          # the reference's BN statistics, kept channels
            ref, new = reference.layers[i], pruned.layers[i]
            if new.bn_enabled:
                new.bn.running_mean.copy_(ref.bn.running_mean[sel])
                new.bn.running_var.copy_(ref.bn.running_var[sel])
        dev = next(pruned.parameters()).device
        xs = [_inputs(images, dev) for images, _ in calib.batches]
        ref_run, new_run = _Streams(reference, xs), _Streams(pruned, xs)
        for i in tqdm(range(len(pruned.layers)), desc="reconstruct", unit="layer",
                      disable=not progress, leave=False):
            layer = pruned.layers[i]
            # grouped / depthwise convs are not one regression: left as they are
            if i in sels and layer.conv.groups == 1:
                conv = reference.layers[i].conv
                targets = [conv(x)[:, sels[i]] for x in ref_run.prev]
                records.append(_fit_layer(layer, sels[i], new_run.prev, targets, i))
            ref_run.step(i)
            new_run.step(i)
    finally:
        reference.train(was[0])
        pruned.train(was[1])
    return records
