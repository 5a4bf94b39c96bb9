"""Inference-time BatchNorm folding: conv + BN -> one conv with a bias, as Darknet, OpenCV and
ONNX Runtime run a trained model. `fuse_batchnorm(model)` returns a fused deep copy in eval mode;
its outputs equal the original's in eval mode (running statistics), never in training mode, and
its state_dict has no `bn` entries, so it is for inference and timing, not for artifacts.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .darknet import ConvLayer, Darknet

__all__ = ["fuse_batchnorm"]


@torch.no_grad()
def _fold(layer: ConvLayer) -> None:
    conv, bn = layer.conv, layer.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    layer.conv = fused
    del layer.bn
    layer.bn_enabled = False


def fuse_batchnorm(model: Darknet) -> Darknet:
    """A copy of `model` (eval mode) with every conv's BatchNorm folded into the conv."""
    fused = copy.deepcopy(model).eval()
    for layer in fused.layers:
        if isinstance(layer, ConvLayer) and layer.bn_enabled:
            _fold(layer)
    return fused
