"""Export an artifact as Darknet cfg + weights, or as ONNX with decoded boxes.

ONNX: input `images` (B, 3, H, W) float RGB in [0, 1]; output `detections` (B, N, 5+C) rows
[cx, cy, w, h, obj, class probs] in input pixels (the same rows as `models.yolo.decode`).
"""
from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .artifacts import build_model
from .errors import YoloCompressError
from .fileio import atomic_open, refuse_overwrite
from .models.cfg import write_cfg
from .models.darknet import Darknet
from .models.weights import save_darknet_weights
from .models.yolo import decode

__all__ = ["DecodedModel", "export_darknet", "export_onnx", "check_onnx"]

try:   # the newest opset of the TorchScript exporter (dynamo=False) this torch has
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as _MAX_OPSET
except ImportError:  # pragma: no cover - another torch: let the exporter say
    _MAX_OPSET = 10 ** 6


class DecodedModel(nn.Module):
    """Darknet model + decode: image batch -> (B, N, 5+C) decoded rows."""

    def __init__(self, model: Darknet):
        super().__init__()
        self.model = model

    def forward(self, x):
        return decode(self.model(x), self.model.heads, (x.shape[-2], x.shape[-1]))


def export_darknet(art: dict, out: str | Path, inputs: Sequence[str | Path] = ()
                   ) -> tuple[Path, Path]:
    """Write `<out>.cfg` and `<out>.weights`; [net] width/height are set to the artifact's input size.
    Neither may be one of `inputs` (the files the export reads, e.g. the artifact)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".cfg", ".weights") else out
    if stem.name in ("", ".", ".."):
        raise YoloCompressError(f"{out}: give a file stem for the .cfg and .weights, e.g. export/model")
    cfg_path, weights_path = stem.with_suffix(".cfg"), stem.with_suffix(".weights")
    refuse_overwrite([cfg_path, weights_path], inputs)
    model = build_model(art)
    blocks = copy.deepcopy(model.blocks)
    blocks[0].set("height", art["input_size"][0])
    blocks[0].set("width", art["input_size"][1])
    with atomic_open(cfg_path, "w", encoding="utf-8") as f:
        f.write(write_cfg(blocks))
    save_darknet_weights(model, weights_path)
    return cfg_path, weights_path


def export_onnx(art: dict, out: str | Path, opset: int = 17, dynamic_batch: bool = True,
                inputs: Sequence[str | Path] = ()) -> Path:
    """Write an ONNX model of the artifact (decoded outputs) at its input size; `out` may not be
    one of `inputs`."""
    if opset < 13:
        raise YoloCompressError(f"ONNX opset {opset} is too old; use 13 or newer")
    if opset > _MAX_OPSET:
        raise YoloCompressError(f"ONNX opset {opset} is newer than this torch's exporter supports "
                                f"(13 to {_MAX_OPSET})")
    out = Path(out)
    refuse_overwrite([out], inputs)
    model = DecodedModel(build_model(art)).eval()
    h, w = art["input_size"]
    dummy = torch.zeros(1, 3, h, w)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), buf, dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["detections"],
            dynamic_axes={"images": {0: "batch"}, "detections": {0: "batch"}} if dynamic_batch
            else None)
    with atomic_open(out, "wb") as f:
        f.write(buf.getvalue())
    return out


def check_onnx(art: dict, path: str | Path, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on a random batch."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise YoloCompressError("onnxruntime is not installed (pip install 'yolocompress[onnx]')") from e
    h, w = art["input_size"]
    x = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = DecodedModel(build_model(art)).eval()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    if got.shape != ref.shape:
        raise YoloCompressError(f"{path}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
    return float(abs(got - ref).max())
