"""Darknet `.weights` read / write.

File = header (int32 major, minor, revision; `seen` uint64 when major*10+minor >= 2, else uint32),
then per conv layer in cfg order, float32 LE: with BN beta, gamma, running_mean, running_var,
weights (OIHW); without BN bias, weights. Partial files (e.g. `yolov4.conv.137`) load the layers
they hold; a file made for another class count loads all but the detection convs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import YoloCompressError
from ..fileio import atomic_open
from .darknet import ConvLayer, Darknet

__all__ = ["WeightsReport", "load_darknet_weights", "save_darknet_weights", "read_header"]


@dataclass
class WeightsReport:
    path: str
    header: tuple[int, int, int, int]             # major, minor, revision, seen
    layers_loaded: int                            # conv layers filled from the file
    convs_total: int
    last_layer: int                               # cfg index of the last layer loaded (-1: none)
    skipped: list[str] = field(default_factory=list)   # detection convs left out (class mismatch)
    file_classes: int | None = None               # class count the file was made for, if it differs

    @property
    def complete(self) -> bool:
        return self.layers_loaded == self.convs_total and not self.skipped

    def summary(self) -> str:
        msg = (f"{self.path}: loaded {self.layers_loaded}/{self.convs_total} conv layers "
               f"(up to layer {self.last_layer})")
        if self.skipped:
            msg += (f"; the file was made for {self.file_classes} classes, so the detection convs "
                    f"{', '.join(self.skipped)} keep their initialisation")
        elif not self.complete:
            msg += "; a partial (backbone) file: the remaining layers keep their initialisation"
        return msg


def _conv_tensors(layer: ConvLayer) -> list[torch.Tensor]:
    """Darknet storage order of one conv's tensors."""
    if layer.bn_enabled:
        bn = layer.bn
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, layer.conv.weight]
    return [layer.conv.bias, layer.conv.weight]


def _conv_layers(model: Darknet) -> list[tuple[int, ConvLayer]]:
    return [(i, m) for i, m in enumerate(model.layers) if isinstance(m, ConvLayer)]


def read_header(data: bytes | np.ndarray, path: str) -> tuple[tuple[int, int, int, int], int]:
    """(major, minor, revision, seen) and the header length in bytes."""
    buf = bytes(data[:20])
    if len(buf) < 16:
        raise YoloCompressError(f"{path}: too short for a Darknet weights header ({len(buf)} bytes)")
    major, minor, revision = np.frombuffer(buf[:12], "<i4").tolist()
    if major * 10 + minor >= 2 and major < 1000 and minor < 1000:
        if len(buf) < 20:
            raise YoloCompressError(f"{path}: too short for a Darknet weights header")
        return (major, minor, revision, int(np.frombuffer(buf[12:20], "<u8")[0])), 20
    return (major, minor, revision, int(np.frombuffer(buf[12:16], "<u4")[0])), 16


def load_darknet_weights(model: Darknet, path: str | os.PathLike) -> WeightsReport:
    """Fill `model` from a Darknet weights file; see the module docstring for partial files."""
    path = str(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise YoloCompressError(f"{path}: cannot read weights ({e.strerror})") from e
    header, offset = read_header(raw, path)
    body = raw[offset:]
    if len(body) % 4:
        raise YoloCompressError(f"{path}: {len(body)} bytes after the header is not a whole "
                                f"number of float32 values")
    floats = body.view("<f4")
    convs = _conv_layers(model)
    detect = {h.index - 1 for h in model.heads}
    sizes = [sum(t.numel() for t in _conv_tensors(m)) for _, m in convs]
    total, available = sum(sizes), len(floats)
    skip_classes = None
    if available > total or (available < total and available not in np.cumsum(sizes)):
        skip_classes = _file_classes(model, convs, sizes, detect, available)
        if skip_classes is None:
            _raise_misfit(path, model, convs, sizes, available)
    report = WeightsReport(path, header, 0, len(convs), -1, file_classes=skip_classes)
    pos = 0
    with torch.no_grad():
        for (i, layer), size in zip(convs, sizes):
            if pos >= available:
                break
            if skip_classes is not None and i in detect:
                pos += _detect_size(model, layer, skip_classes, i)
                report.skipped.append(model.infos[i].name)
                continue
            for t in _conv_tensors(layer):
                n = t.numel()
                t.copy_(torch.from_numpy(floats[pos:pos + n].astype(np.float32)).view_as(t))
                pos += n
            report.layers_loaded += 1
            report.last_layer = i
    if pos != available:  # only reachable through a class solve that does not add up
        _raise_misfit(path, model, convs, sizes, available)
    return report


def _detect_size(model: Darknet, layer: ConvLayer, classes: int, index: int) -> int:
    head = next(h for h in model.heads if h.index == index + 1)
    n = (classes + 5) * head.num_anchors
    per_filter = layer.conv.weight[0].numel()
    return n * per_filter + n * (4 if layer.bn_enabled else 1)


def _file_classes(model, convs, sizes, detect, available) -> int | None:
    """The class count for which the file's size fits this architecture, if one does."""
    fixed = sum(s for (i, _), s in zip(convs, sizes) if i not in detect)
    size_at = {i: _detect_size(model, m, 0, i) for i, m in convs if i in detect}
    base = sum(size_at.values())                      # sizes at 0 classes
    per_class = sum(_detect_size(model, m, 1, i) - size_at[i] for i, m in convs if i in detect)
    extra = available - fixed - base
    if per_class <= 0 or extra <= 0 or extra % per_class:
        return None
    classes = extra // per_class
    return classes if classes != model.classes else None


def _raise_misfit(path, model, convs, sizes, available):
    total = sum(sizes)
    if available > total:
        raise YoloCompressError(
            f"{path}: {available - total} float32 values more than this cfg's "
            f"{len(convs)} conv layers hold ({total}); wrong cfg for these weights?")
    cum = 0
    for (i, m), size in zip(convs, sizes):
        if cum + size > available:
            raise YoloCompressError(
                f"{path}: the file ends inside layer {i} ({model.infos[i].name}, "
                f"{m.conv.out_channels} filters): {available - cum} of its {size} values present; "
                f"truncated file or wrong cfg?")
        cum += size
    raise YoloCompressError(f"{path}: weights do not fit the cfg")  # pragma: no cover


def save_darknet_weights(model: Darknet, path: str | os.PathLike,
                         header: tuple[int, int, int, int] = (0, 2, 5, 0)) -> None:
    """Write every conv layer of `model` (atomic: temp file + rename)."""
    path = Path(path)
    major, minor, revision, seen = header
    parts = [np.array([major, minor, revision], "<i4").tobytes()]
    parts.append(np.array([seen], "<u8" if major * 10 + minor >= 2 else "<u4").tobytes())
    for _, layer in _conv_layers(model):
        for t in _conv_tensors(layer):
            parts.append(t.detach().cpu().float().numpy().astype("<f4").tobytes())
    with atomic_open(path, "wb") as f:
        for p in parts:
            f.write(p)
