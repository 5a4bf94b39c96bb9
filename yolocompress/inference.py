"""Model -> detections in original-image pixels; shared by `predict` and evaluation.

`detect_batch` takes a uint8 batch as the data loader yields it (letterboxed or stretched, with the
metas that invert that) and returns one `Detections` per image. The model is a `Darknet` (PyTorch)
or an `onnx_backend.OnnxModel` (an exported file in ONNX Runtime); `decoded_rows` is the one seam
between them, and everything after it (NMS, mapping back, scoring) is shared. `predict_images`
reads image files, draws the boxes and writes the COCO-results JSON.

Output names (`image_ids`): an image's id, the name of its annotated copy and its `image_id` in
detections.json, is its file stem; where several inputs share a stem (a/x.jpg, b/x.jpg, x.png),
the first in input order keeps it and the next get `<stem>-2`, `<stem>-3`, ... (skipping any
name that is another input's stem), so no output replaces another and detections never merge.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from .data.dataset import to_original
from .data.transforms import letterbox, resize
from .errors import YoloCompressError
from .eval.detections import Detections, save_detections_json
from .fileio import atomic_open, make_dir, refuse_overwrite
from .models.darknet import Darknet
from .models.yolo import decode, postprocess
from .onnx_backend import OnnxModel

__all__ = ["Model", "decoded_rows", "detect_batch", "preprocess", "predict_images",
           "draw_detections", "image_ids"]

Model = Darknet | OnnxModel


@torch.no_grad()
def decoded_rows(model: Model, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) RGB batch -> decoded rows (B, N, 5+C) in input pixels (either backend)."""
    if isinstance(model, OnnxModel):
        return model(images.float().div_(255))
    device = next(model.parameters()).device
    x = images.to(device, non_blocking=True).float().div_(255)
    return decode(model(x), model.heads, (x.shape[-2], x.shape[-1]))


@torch.no_grad()
def detect_batch(model: Model, images: torch.Tensor, metas: Sequence[dict[str, Any]],
                 conf_thresh: float = 0.25, iou_thresh: float = 0.45,
                 max_det: int = 300) -> list[Detections]:
    """uint8 (B, 3, H, W) batch -> per-image Detections mapped back to the original image."""
    decoded = decoded_rows(model, images)
    out = []
    for pred, meta in zip(postprocess(decoded.float(), conf_thresh, iou_thresh, max_det), metas):
        boxes = to_original(pred.boxes.cpu(), meta).numpy()
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # fully in the padding
        out.append(Detections(meta["image_id"], boxes[keep], pred.scores.cpu().numpy()[keep],
                              pred.labels.cpu().numpy()[keep]))
    return out


def preprocess(path: str | Path, size: int, use_letterbox: bool, image_id: str | None = None
               ) -> tuple[np.ndarray, torch.Tensor, dict[str, Any]]:
    """Read an image file -> (original BGR, uint8 (3, size, size) RGB tensor, meta for to_original);
    meta's image_id is `image_id`, by default the file stem."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise YoloCompressError(f"{path}: cannot read image (missing, unreadable or not an image)")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if use_letterbox:
        img, scale, pad = letterbox(rgb, size)
    else:
        (img, scale), pad = resize(rgb, size), (0, 0)
    meta = {"image_id": image_id or Path(path).stem, "orig_size": bgr.shape[:2], "scale": scale, "pad": pad}
    return bgr, torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), meta


def draw_detections(bgr: np.ndarray, det: Detections, names: Sequence[str]) -> np.ndarray:
    """A copy of the image with labelled boxes, one colour per class."""
    out = bgr.copy()
    for box, score, label in zip(det.boxes, det.scores, det.labels):
        hue = int(label) * 47 % 180
        color = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0].tolist()
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        text = f"{names[int(label)]} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(out, (x1, max(0, y1 - th - 4)), (x1 + tw + 2, y1), color, -1)
        cv2.putText(out, text, (x1 + 1, max(th, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


def image_ids(paths: Sequence[str | Path]) -> list[str]:
    """One distinct output name per path, by the rule in the module docstring."""
    stems = [Path(p).stem for p in paths]
    taken, out = set(stems), []
    used: set[str] = set()
    for stem in stems:
        name, k = stem, 1
        while name in used or (k > 1 and name in taken):
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        out.append(name)
    return out


def predict_images(model: Model, names: Sequence[str], paths: Sequence[str | Path],
                   out_dir: str | Path, size: int, use_letterbox: bool,
                   conf_thresh: float = 0.25, iou_thresh: float = 0.45,
                   max_det: int = 300) -> list[Detections]:
    """Detect on image files; writes `<out_dir>/<id>.jpg` per image and `<out_dir>/detections.json`
    (ids by `image_ids`). `out_dir` must not be a folder the images are in: the annotated copies
    would mix with (or, for .jpg inputs, replace) the originals."""
    out_dir = Path(out_dir)
    ids = image_ids(paths)
    refuse_overwrite([out_dir], [Path(p).parent for p in paths])
    refuse_overwrite([out_dir / f"{i}.jpg" for i in ids] + [out_dir / "detections.json"], paths)
    make_dir(out_dir)
    model.eval()
    results = []
    for path, image_id in tqdm(list(zip(paths, ids)), desc="predict", unit="img", disable=None):
        bgr, tensor, meta = preprocess(path, size, use_letterbox, image_id)
        (det,) = detect_batch(model, tensor[None], [meta], conf_thresh, iou_thresh, max_det)
        results.append(det)
        ok, buf = cv2.imencode(".jpg", draw_detections(bgr, det, names))
        if not ok:
            raise YoloCompressError(f"{path}: could not encode the annotated image")
        with atomic_open(out_dir / f"{image_id}.jpg", "wb") as f:
            f.write(buf.tobytes())
    save_detections_json(out_dir / "detections.json", results, names)
    return results
