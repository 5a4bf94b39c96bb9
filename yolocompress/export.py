"""Export an artifact as Darknet cfg + weights, or as ONNX with decoded boxes.

ONNX: input `images` (B, 3, H, W) float RGB in [0, 1]; output `detections` (B, N, 5+C) rows
[cx, cy, w, h, obj, class probs] in input pixels (the same rows as `models.yolo.decode`); BatchNorm
folded into the convs; the class names, input size and letterbox flag in `metadata_props`
(`onnx_backend.METADATA_KEYS`), so `predict` / `eval` run the file as they run the artifact.
A maxpool with even padding is written as one MaxPool with `pads` (no Pad with -inf).
A gated (FBS) artifact keeps its gates in ONNX (ReduceMean, Gemm, TopK, ScatterElements: the
masked channels are still computed, then zeroed); Darknet has no gates, so that export refuses it.

Mish (`MISH_FORMS`): ONNX Runtime has no Mish kernel (it expands opset 18's `Mish` function into
Softplus + Tanh + Mul, and its Softplus is scalar code: ~45 % of yolov4's time), so the default
form writes mish(x) = x * tanh(softplus(x)) through the logistic, which it runs vectorised:
s = sigmoid(x), n = s * (2 - s) = 1 - (1 - s)^2, tanh(softplus(x)) = n / (2 - n) (exact: with
e = exp(x), 1 + e = 1 / (1 - s), and tanh(log z) = (z^2 - 1) / (z^2 + 1)); no overflow for any x.
`mish="op"` writes the single ONNX `Mish` op (opset >= 18) for runtimes that implement it (OpenCV
DNN runs it as one fused activation); `mish="softplus"` keeps torch's Softplus + Tanh + Mul.
"""
from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .artifacts import build_model
from .errors import YoloCompressError
from .fileio import atomic_open, refuse_overwrite
from .models.cfg import write_cfg
from .models.darknet import Darknet
from .models.layers import MaxPoolLayer
from .models.weights import save_darknet_weights
from .models.yolo import decode
from .onnx_backend import metadata_props, session

__all__ = ["DEFAULT_OPSET", "MISH_FORMS", "DecodedModel", "SigmoidMish", "deploy_form",
           "export_darknet", "export_onnx", "check_onnx"]

DEFAULT_OPSET = 17   # 17 and 18 give the same graph with the sigmoid mish (docs/BENCHMARKS.md)

try:   # the newest opset of the TorchScript exporter (dynamo=False) this torch has
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as _MAX_OPSET
except ImportError:  # pragma: no cover - another torch: let the exporter say
    _MAX_OPSET = 10 ** 6


class SigmoidMish(nn.Module):
    """mish(x) through the logistic (module docstring); equals nn.Mish to float rounding."""

    def forward(self, x):
        s = torch.sigmoid(x)
        n = s * (2 - s)
        return x * n / (2 - n)


class _MishOpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return F.mish(x)

    @staticmethod
    def symbolic(g, x):
        return g.op("Mish", x)


class OpMish(nn.Module):
    """nn.Mish that the TorchScript exporter writes as the one ONNX `Mish` op (opset >= 18)."""

    def forward(self, x):
        return _MishOpFn.apply(x)


# --mish choice -> (module replacing nn.Mish in the exported copy, lowest opset it needs)
MISH_FORMS = {"sigmoid": (SigmoidMish, 0), "op": (OpMish, 18), "softplus": (nn.Mish, 0)}


def _replace_mish(model: nn.Module, form: type[nn.Module]) -> nn.Module:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Mish) and form is not nn.Mish:
                setattr(module, name, form())
    return model


def _pooling_pads(model: nn.Module) -> nn.Module:
    """Darknet maxpools with even total padding as one MaxPool with `pads` (same -inf padding),
    not Pad(-inf) + MaxPool: no infinite constant in the graph for INT8 calibration to meet."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, MaxPoolLayer) and len(set(child.pad)) == 1 \
                    and child.pad[0] <= child.size // 2:
                setattr(module, name, nn.MaxPool2d(child.size, child.stride, child.pad[0]))
    return model


def deploy_form(model: nn.Module, mish: str = "sigmoid") -> nn.Module:
    """`model` (changed in place) as the ONNX export writes it: mish as MISH_FORMS[mish], even
    maxpool padding inside the MaxPool. The latency table times this form too."""
    return _pooling_pads(_replace_mish(model, MISH_FORMS[mish][0]))


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
    if art.get("gating") is not None:
        where = inputs[0] if inputs else "artifact"
        raise YoloCompressError(f"{where}: a gated (FBS) artifact cannot be written as Darknet cfg "
                                f"+ weights: Darknet has no per-image channel gates; export it to "
                                f"ONNX (which keeps them)")
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


def export_onnx(art: dict, out: str | Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                inputs: Sequence[str | Path] = (), mish: str = "sigmoid") -> Path:
    """Write an ONNX model of the artifact (decoded outputs, metadata) at its input size, mish
    written as `MISH_FORMS[mish]`; `out` may not be one of `inputs`."""
    if mish not in MISH_FORMS:
        raise YoloCompressError(f"unknown mish form '{mish}' (one of {', '.join(MISH_FORMS)})")
    min_opset = MISH_FORMS[mish][1]
    if opset < 13:
        raise YoloCompressError(f"ONNX opset {opset} is too old; use 13 or newer")
    if opset < min_opset:
        raise YoloCompressError(f"mish form '{mish}' needs ONNX opset {min_opset} or newer, got "
                                f"{opset}")
    if opset > _MAX_OPSET:
        raise YoloCompressError(f"ONNX opset {opset} is newer than this torch's exporter supports "
                                f"(13 to {_MAX_OPSET})")
    try:
        import onnx
    except ImportError as e:
        raise YoloCompressError("onnx is not installed (pip install 'yolocompress[onnx]')") from e
    out = Path(out)
    refuse_overwrite([out], inputs)
    darknet = build_model(art)
    model = DecodedModel(deploy_form(darknet, mish)).eval()
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
    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, metadata_props(art["classes"], art["input_size"],
                                                      darknet.letterbox))
    with atomic_open(out, "wb") as f:
        f.write(proto.SerializeToString())
    return out


def check_onnx(art: dict, path: str | Path, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on a random batch."""
    h, w = art["input_size"]
    x = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = DecodedModel(build_model(art)).eval()(x).numpy()
    got = session(path).run(None, {"images": x.numpy()})[0]
    if got.shape != ref.shape:
        raise YoloCompressError(f"{path}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
    return float(abs(got - ref).max())
