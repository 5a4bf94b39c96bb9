"""A per-layer latency model of a Darknet cfg in a runtime, for latency budgets (prune.budget_target
latency).

    table = measure_table(blocks, (h, w), backend="onnxruntime", threads=2, batch=1)
    ms = table.predict(slim_blocks)          # predicted forward time of a slimmed copy of blocks

Each conv is timed alone (conv + bias + its activation, BN folded as deployed; mish in the export's
sigmoid form) at a grid of input x output channel counts (`GRID` shares of its own), with the
protocol of eval.speed; the prediction interpolates bilinearly in (in, out) channels (linearly
below the smallest grid point). Convs of one shape (channels, kernel, stride, input size,
activation) are timed once. The layers that are not convs (routes, shortcuts, pools, upsamples,
heads) are one measured remainder, the whole model's time less its convs' at full width,
scaled by the share of their output channels that are kept. A table is keyed by the cfg text,
input size, backend, threads and batch, and cached as JSON (`load_or_measure`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import YoloCompressError
from ..fileio import atomic_open
from ..models.cfg import Block, write_cfg
from ..models.kinds import conv_padding
from ..models.layers import activation
from ..models.shapes import layer_io

__all__ = ["GRID", "BACKENDS", "LatencyTable", "measure_table", "load_or_measure", "table_key",
           "time_model"]

GRID = (0.25, 0.5, 0.75, 1.0)
BACKENDS = ("onnxruntime", "torch")
VERSION = 1


def _grid(n: int) -> list[int]:
    return sorted({max(1, round(f * n)) for f in GRID})


def _interp(xs: list[int], ys: np.ndarray, x: float) -> np.ndarray:
    """Linear interpolation along axis 0 of ys over xs, extended linearly past either end."""
    if len(xs) == 1:
        return ys[0]
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


@dataclass(frozen=True)
class ConvEntry:
    ins: list[int]                 # grid of input channel counts
    outs: list[int]                # grid of output channel counts
    ms: list[list[float]]          # ms[i][j] at (ins[i], outs[j])

    def predict(self, cin: int, cout: int) -> float:
        row = _interp(self.ins, np.asarray(self.ms), cin)
        return float(max(_interp(self.outs, row, cout), 0.0))


@dataclass(frozen=True)
class LatencyTable:
    key: dict                      # table_key(): what it was measured for
    convs: dict[str, ConvEntry]    # conv layer index (str, JSON) -> its entry
    full_channels: int             # output channels of the non-conv layers at full width
    rest_ms: float                 # the non-conv layers' time at full width
    total_ms: float                # the whole model, measured

    def predict(self, blocks: list[Block]) -> float:
        """Predicted ms of `blocks` (this table's cfg with other `filters=`)."""
        io = layer_io(blocks, *self.key["size"])
        conv_ms, other = 0.0, 0
        for i, (b, (ins, out)) in enumerate(zip(blocks[1:], io)):
            if b.type == "convolutional":
                conv_ms += self.convs[str(i)].predict(ins[0].c, out.c)
            elif b.type != "yolo":
                other += out.c
        return conv_ms + self.rest_ms * other / max(self.full_channels, 1)

    def to_dict(self) -> dict:
        return {"version": VERSION, "key": self.key, "full_channels": self.full_channels,
                "rest_ms": self.rest_ms, "total_ms": self.total_ms,
                "convs": {k: asdict(v) for k, v in self.convs.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        return cls(d["key"], {k: ConvEntry(**v) for k, v in d["convs"].items()},
                   d["full_channels"], d["rest_ms"], d["total_ms"])


def table_key(blocks: list[Block], size: tuple[int, int], backend: str, threads: int,
              batch: int) -> dict:
    return {"cfg_sha256": hashlib.sha256(write_cfg(blocks).encode()).hexdigest(),
            "size": list(size), "backend": backend, "threads": threads, "batch": batch}


def _conv_module(b: Block, cin: int, cout: int) -> nn.Module:
    from ..export import deploy_form

    k, s, pad = b.get_int("size"), b.get_int("stride", 1), conv_padding(b)
    conv = nn.Conv2d(cin, cout, k, s, pad, bias=True)
    return deploy_form(nn.Sequential(conv, activation(b, "logistic"))).eval()


class _Timer:
    """Times a module (or a whole Darknet) on one backend with eval.speed's protocol."""

    def __init__(self, backend: str, threads: int, batch: int, warmup: int, iters: int):
        if backend not in BACKENDS:
            raise YoloCompressError(f"latency table: unknown backend '{backend}' (one of "
                                    f"{', '.join(BACKENDS)})")
        self.backend, self.threads, self.batch = backend, threads, batch
        self.warmup, self.iters = warmup, iters
        self.dir = tempfile.TemporaryDirectory()

    def __call__(self, module: nn.Module, channels: int, hw: tuple[int, int]) -> float:
        from ..eval.speed import measure_latency, measure_latency_onnx

        if self.backend == "torch":
            return measure_latency(module, hw, self.batch, warmup=self.warmup, iters=self.iters,
                                   threads=self.threads, channels=channels)["ms_median"]
        path = Path(self.dir.name) / "layer.onnx"
        x = torch.zeros(1, channels, *hw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], dynamic_axes={"x": {0: "b"}})
        return measure_latency_onnx(path, hw, self.batch, warmup=self.warmup, iters=self.iters,
                                    threads=self.threads, channels=channels)["ms_median"]


def _whole(blocks: list[Block], size: tuple[int, int], timer: _Timer) -> float:
    """ms of the whole model (random weights, BN folded, mish as exported; raw head outputs)."""
    from ..export import deploy_form
    from ..models.darknet import Darknet
    from ..models.fuse import fuse_batchnorm

    model = deploy_form(fuse_batchnorm(Darknet(blocks)))
    return timer(_Tuple(model).eval(), blocks[0].get_int("channels", 3), size)


class _Tuple(nn.Module):
    """The Darknet's head outputs as a tuple (what the ONNX exporter takes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model(x))


def time_model(blocks: list[Block], size: tuple[int, int], backend: str = "onnxruntime",
               threads: int = 2, batch: int = 1, warmup: int = 3, iters: int = 20) -> float:
    """Median ms of a forward pass of the cfg `blocks` as the table's model is timed."""
    return _whole(blocks, size, _Timer(backend, threads, batch, warmup, iters))


def measure_table(blocks: list[Block], size: tuple[int, int], backend: str = "onnxruntime",
                  threads: int = 2, batch: int = 1, warmup: int = 2, iters: int = 10
                  ) -> LatencyTable:
    """Time every conv shape of `blocks` at the channel grid, and the whole model."""
    timer = _Timer(backend, threads, batch, warmup, iters)
    io = layer_io(blocks, *size)
    shapes: dict[tuple, list[int]] = {}
    for i, (b, (ins, out)) in enumerate(zip(blocks[1:], io)):
        if b.type == "convolutional":
            if b.get_int("groups", 1) != 1:
                raise YoloCompressError(f"{b.where('groups')}: latency tables do not model "
                                        "grouped convs")
            key = (ins[0].c, out.c, ins[0].h, ins[0].w, b.get_int("size"),
                   b.get_int("stride", 1), conv_padding(b), b.get("activation", "logistic"))
            shapes.setdefault(key, []).append(i)
    points = [(key, cin, cout) for key in shapes for cin in _grid(key[0])
              for cout in _grid(key[1])]
    ms: dict[tuple, float] = {}
    for key, cin, cout in tqdm(points, desc=f"latency table ({backend})", unit="conv",
                               disable=None, leave=False):
        b = blocks[1 + shapes[key][0]]
        ms[key, cin, cout] = timer(_conv_module(b, cin, cout), cin, (key[2], key[3]))
    convs: dict[str, ConvEntry] = {}
    for key, layers in shapes.items():
        ins, outs = _grid(key[0]), _grid(key[1])
        entry = ConvEntry(ins, outs, [[ms[key, a, c] for c in outs] for a in ins])
        convs.update({str(i): entry for i in layers})
    total = _whole(blocks, size, timer)
    conv_full = sum(convs[str(i)].predict(ins[0].c, out.c)
                    for i, (b, (ins, out)) in enumerate(zip(blocks[1:], io))
                    if b.type == "convolutional")
    other = sum(out.c for b, (_, out) in zip(blocks[1:], io)
                if b.type not in ("convolutional", "yolo"))
    return LatencyTable(table_key(blocks, size, backend, threads, batch), convs, other,
                        max(total - conv_full, 0.0), total)


def load_or_measure(blocks: list[Block], size: tuple[int, int], cache_dir: str | os.PathLike,
                    backend: str = "onnxruntime", threads: int = 2, batch: int = 1
                    ) -> LatencyTable:
    """The cached table for (cfg, size, backend, threads, batch) under `cache_dir`, measured and
    written (atomically) when there is none."""
    key = table_key(blocks, size, backend, threads, batch)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latency-{name}.json"
    if path.exists():
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise YoloCompressError(f"{path}: unreadable latency table ({e}); delete it") from e
        if d.get("version") == VERSION and d.get("key") == key:
            return LatencyTable.from_dict(d)
    table = measure_table(blocks, size, backend, threads, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(table.to_dict(), f)
    return table
