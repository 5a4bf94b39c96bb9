"""Inference latency of a model's forward pass (raw head outputs: no decode, no NMS).

`measure_latency(model, img_size, batch)` times `iters` forward passes of a fixed random batch
after `warmup` untimed ones, under torch.inference_mode with a fixed torch thread count, and
returns per-pass statistics in milliseconds (the median is the number to quote). The model is
left as it was (device, train/eval mode) and the thread count is restored.
`measure_latency_onnx(path, ...)` does the same for an ONNX file in ONNX Runtime (CPU, the session
options of `onnx_backend.session_options`), and `measure_latency_opencv(...)` for OpenCV DNN (CPU,
its own backend): a Darknet cfg + weights through its Darknet importer where this OpenCV has one
(OpenCV < 5), or an ONNX file through its ONNX importer. All three share one protocol (`_time`,
`_stats`: `warmup` untimed passes, then `iters` timed ones of one fixed random batch) and report
`backend` ("torch", "onnxruntime", "opencv-darknet", "opencv-onnx") and `threads`.
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import YoloCompressError

__all__ = ["measure_latency", "measure_latency_onnx", "measure_latency_opencv",
           "opencv_has_darknet"]


def _size(img_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h < 1 or w < 1:
        raise YoloCompressError(f"latency: image size must be positive, got {img_size}")
    return int(h), int(w)


def _check(batch: int, warmup: int, iters: int, threads: int | None) -> None:
    if batch < 1 or iters < 1 or warmup < 0:
        raise YoloCompressError(f"latency: need batch >= 1, iters >= 1 and warmup >= 0, got "
                                f"batch={batch}, iters={iters}, warmup={warmup}")
    if threads is not None and threads < 1:
        raise YoloCompressError(f"latency: threads must be >= 1, got {threads}")


def _stats(times_s: list[float], batch: int) -> dict:
    ms = [t * 1e3 for t in times_s]
    median = statistics.median(ms)
    return {
        "ms_median": median,
        "ms_mean": statistics.fmean(ms),
        "ms_min": min(ms),
        "ms_max": max(ms),
        "ms_std": statistics.pstdev(ms),
        "ms_p90": float(np.percentile(ms, 90)),
        "ms_per_image": median / batch,
        "images_per_s": 1e3 * batch / median,
    }


def _time(run: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None]
          ) -> list[float]:
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def measure_latency(model: nn.Module, img_size: int | tuple[int, int], batch: int = 1,
                    device: str | torch.device = "cpu", warmup: int = 3, iters: int = 20,
                    threads: int | None = None, channels: int = 3, seed: int = 0,
                    fuse_bn: bool = False) -> dict:
    """{ms_median, ms_mean, ms_min, ms_max, ms_std, ms_p90, ms_per_image, images_per_s, batch,
    img_size, iters, threads, device, backend, fused_bn} for `model` on a (batch, channels, h, w)
    input.

    `threads` sets torch's intra-op threads while timing (None: as they are now); it is reported
    either way. A model not on `device` is timed as a copy moved there. `fuse_bn` times a copy of
    a Darknet with BatchNorm folded into the convs, as deployed (Darknet, OpenCV, ONNX Runtime)."""
    h, w = _size(img_size)
    _check(batch, warmup, iters, threads)
    device = torch.device(device)
    param = next(model.parameters(), None)
    on_device = param is None or param.device.type == device.type and (
        device.index is None or param.device.index == device.index)
    m = model if on_device else copy.deepcopy(model).to(device)
    if fuse_bn:
        from ..models.fuse import fuse_batchnorm
        m = fuse_batchnorm(m)
    x = torch.rand(batch, channels, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    was_training, old_threads = model.training, torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        m.eval()
        with torch.inference_mode():
            times = _time(lambda: m(x), warmup, iters, sync)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    return {**_stats(times, batch), "batch": batch, "img_size": [h, w], "iters": iters,
            "threads": used, "device": str(device), "backend": "torch", "fused_bn": fuse_bn}


def _input(batch: int, channels: int, h: int, w: int, seed: int) -> np.ndarray:
    return torch.rand(batch, channels, h, w, generator=torch.Generator().manual_seed(seed)).numpy()


def _result(times: list[float], batch: int, h: int, w: int, iters: int, threads: int,
            backend: str) -> dict:
    return {**_stats(times, batch), "batch": batch, "img_size": [h, w], "iters": iters,
            "threads": threads, "device": "cpu", "backend": backend}


def measure_latency_onnx(path: str | os.PathLike, img_size: int | tuple[int, int], batch: int = 1,
                         warmup: int = 3, iters: int = 20, threads: int | None = None,
                         channels: int = 3, seed: int = 0) -> dict:
    """measure_latency's statistics for an ONNX model in ONNX Runtime's CPU provider; `threads`
    sets its intra-op threads (None: ONNX Runtime's default, reported as 0)."""
    from ..onnx_backend import session

    h, w = _size(img_size)
    _check(batch, warmup, iters, threads)
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    x = _input(batch, channels, h, w, seed)
    times = _time(lambda: sess.run(None, {name: x}), warmup, iters, lambda: None)
    return _result(times, batch, h, w, iters, threads or 0, "onnxruntime")


def opencv_has_darknet() -> bool:
    """Whether this OpenCV still has its Darknet importer (removed in OpenCV 5)."""
    import cv2
    return hasattr(cv2.dnn, "readNetFromDarknet")


def measure_latency_opencv(model: str | os.PathLike, img_size: int | tuple[int, int],
                           batch: int = 1, warmup: int = 3, iters: int = 20,
                           threads: int | None = None, channels: int = 3, seed: int = 0,
                           weights: str | os.PathLike | None = None) -> dict:
    """measure_latency's statistics for OpenCV DNN on the CPU: `model` a Darknet .cfg with its
    `weights` (the Darknet importer; an error where this OpenCV lacks it), or an .onnx file.
    `threads` sets cv2's thread count while timing (None: as it is; restored afterwards)."""
    import cv2

    h, w = _size(img_size)
    _check(batch, warmup, iters, threads)
    model = Path(model)
    for p in (model, *([Path(weights)] if weights is not None else [])):
        if not p.is_file():
            raise YoloCompressError(f"{p}: no such file")
    if weights is not None:
        if not opencv_has_darknet():
            raise YoloCompressError(f"OpenCV {cv2.__version__} has no Darknet importer (removed in "
                                    f"OpenCV 5); time the ONNX export instead")
        net, backend = cv2.dnn.readNetFromDarknet(str(model), str(weights)), "opencv-darknet"
    else:
        try:
            net, backend = cv2.dnn.readNetFromONNX(str(model)), "opencv-onnx"
        except cv2.error as e:
            raise YoloCompressError(f"{model}: OpenCV DNN cannot load it ({str(e).strip()[-200:]})"
                                    ) from e
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    outputs = net.getUnconnectedOutLayersNames()
    x = _input(batch, channels, h, w, seed)

    def run():
        net.setInput(x)
        return net.forward(outputs)

    old = cv2.getNumThreads()
    if threads is not None:
        cv2.setNumThreads(threads)
    try:
        times = _time(run, warmup, iters, lambda: None)
        used = cv2.getNumThreads()
    finally:
        cv2.setNumThreads(old)
    return _result(times, batch, h, w, iters, used, backend)
