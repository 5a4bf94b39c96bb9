"""Latency measurement: statistics over the timed passes only, inference mode, fixed threads
restored afterwards, the model left as it was; ONNX Runtime variant; bad arguments."""
import time
import warnings

import pytest
import torch
from torch import nn

from yolocompress.errors import YoloCompressError
from yolocompress.eval.speed import (measure_latency, measure_latency_onnx,
                                     measure_latency_opencv, opencv_has_darknet)


class Sleeper(nn.Module):
    """Sleeps a scripted number of ms per forward and records what it saw."""

    def __init__(self, ms):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.ms = list(ms)
        self.seen = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), torch.get_num_threads(), self.training,
                          torch.is_inference_mode_enabled()))
        time.sleep(self.ms[len(self.seen) - 1] / 1e3)
        return self.conv(x)


def test_statistics_cover_the_timed_passes_only():
    # 2 warm-up passes of 80 ms, then 3 timed passes of 10, 30 and 20 ms
    m = Sleeper([80, 80, 10, 30, 20])
    r = measure_latency(m, 32, batch=2, warmup=2, iters=3)
    assert len(m.seen) == 5
    assert 20 <= r["ms_median"] < 28 and 10 <= r["ms_min"] < 18 and 30 <= r["ms_max"] < 60
    assert 20 <= r["ms_mean"] < 30
    assert r["ms_per_image"] == pytest.approx(r["ms_median"] / 2)
    assert r["images_per_s"] == pytest.approx(2000 / r["ms_median"])
    assert (r["batch"], r["img_size"], r["iters"], r["device"], r["backend"]) == \
        (2, [32, 32], 3, "cpu", "torch")


def test_threads_inference_mode_and_model_state():
    m = Sleeper([0] * 5).train()
    before = torch.get_num_threads()
    r = measure_latency(m, (32, 48), batch=3, warmup=1, iters=3, threads=2)
    assert r["threads"] == 2
    assert all(seen == ((3, 3, 32, 48), 2, False, True) for seen in m.seen)
    assert torch.get_num_threads() == before and m.training
    r = measure_latency(m, 32, warmup=0, iters=1)
    assert r["threads"] == before and m.seen[-1][1] == before


def test_bad_arguments_are_errors(tmp_path):
    m = Sleeper([0] * 4)
    for kw, msg in [({"batch": 0}, "batch >= 1"), ({"iters": 0}, "iters >= 1"),
                    ({"warmup": -1}, "warmup >= 0"), ({"threads": 0}, "threads must be >= 1")]:
        with pytest.raises(YoloCompressError, match=msg):
            measure_latency(m, 32, **kw)
    with pytest.raises(YoloCompressError, match="image size must be positive"):
        measure_latency(m, (0, 32))
    assert m.seen == []
    pytest.importorskip("onnxruntime")
    with pytest.raises(YoloCompressError, match="no such ONNX file"):
        measure_latency_onnx(tmp_path / "missing.onnx", 32)


def _small_onnx(path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the TorchScript exporter's deprecation notices
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                          input_names=["images"], output_names=["out"],
                          dynamic_axes={"images": {0: "batch"}, "out": {0: "batch"}})
    return path


def test_onnx_runtime_latency(tmp_path):
    pytest.importorskip("onnxruntime")
    path = _small_onnx(tmp_path / "m.onnx")
    r = measure_latency_onnx(path, 32, batch=4, warmup=1, iters=3, threads=1)
    assert (r["backend"], r["threads"], r["batch"], r["iters"]) == ("onnxruntime", 1, 4, 3)
    assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"]


def test_opencv_latency_onnx_importer_sets_and_restores_threads(tmp_path):
    import cv2
    path = _small_onnx(tmp_path / "m.onnx")
    before = cv2.getNumThreads()
    r = measure_latency_opencv(path, 32, batch=2, warmup=1, iters=3, threads=1)
    assert (r["backend"], r["threads"], r["batch"], r["iters"], r["img_size"]) == \
        ("opencv-onnx", 1, 2, 3, [32, 32])
    assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"]
    assert cv2.getNumThreads() == before
    with pytest.raises(YoloCompressError, match="no such file"):
        measure_latency_opencv(tmp_path / "missing.onnx", 32)
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    with pytest.raises(YoloCompressError, match="OpenCV DNN cannot load it"):
        measure_latency_opencv(tmp_path / "bad.onnx", 32)


def test_opencv_darknet_importer_or_a_clear_error(tmp_path):
    from conftest import TINY_CFG
    from yolocompress.artifacts import artifact_from_model
    from yolocompress.export import export_darknet
    from yolocompress.models.cfg import read_cfg
    from yolocompress.models.darknet import Darknet
    m = Darknet(read_cfg(TINY_CFG), classes=2)
    cfg, weights = export_darknet(artifact_from_model(m, "baseline", ["a", "b"],
                                                      input_size=[64, 64]), tmp_path / "m")
    if opencv_has_darknet():
        r = measure_latency_opencv(cfg, 64, warmup=0, iters=2, threads=1, weights=weights)
        assert r["backend"] == "opencv-darknet" and r["iters"] == 2
    else:   # OpenCV 5 removed the importer
        with pytest.raises(YoloCompressError, match="has no Darknet importer"):
            measure_latency_opencv(cfg, 64, weights=weights)


def test_bench_speed_summary_is_the_median_of_round_medians_with_spread():
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "bench_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"arm": arm, "backend": be, "batch": 1, "threads": 2, "ms_median": ms}
            for arm, be, times in (("ours", "onnxruntime", (90, 100, 300)),
                                   ("cv", "opencv-onnx", (120, 125, 110)))
            for ms in times]
    summ = {s["backend"]: s for s in bench.summary(rows)}
    assert (summ["onnxruntime"]["ms"], summ["onnxruntime"]["ms_lo"], summ["onnxruntime"]["ms_hi"],
            summ["onnxruntime"]["rounds"]) == (100, 90, 300, 3)
    assert summ["opencv-onnx"]["ms"] == 120
    table = bench.table(list(summ.values())).splitlines()
    assert table[2] == "| onnxruntime | ours | 1 | 2 | 100 | 90-300 | 0.83x |"
    assert table[3] == "| opencv-onnx | cv | 1 | 2 | 120 | 110-125 | 1.00x |"
