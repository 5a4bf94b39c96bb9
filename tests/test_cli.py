"""The command line: info numbers, import/export, and bad inputs as one-line errors with exit 2."""
import json
import subprocess
import sys

import pytest

from yolocompress.cli import main

from conftest import ROOT, TINY_CFG, cfg_path


def test_info_json_reproduces_yolov4_reference(capsys):
    assert main(["info", str(cfg_path("yolov4")), "--img-size", "416", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 64_363_101
    assert d["flops"] == pytest.approx(60.14e9, rel=1e-3)
    assert d["flops_conv"] == pytest.approx(60.105e9, rel=1e-4)
    assert len(d["layers"]) == 162 and d["layers"][0]["out"] == [32, 416, 416]
    assert main(["info", str(cfg_path("yolov4")), "--img-size", "416", "--classes", "20",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 64_040_001


def test_info_table_on_artifact(tmp_path, capsys):
    art = tmp_path / "a.pt"
    assert main(["import-darknet", str(TINY_CFG), "--classes", "2", "--out", str(art)]) == 0
    assert main(["info", str(art)]) == 0
    out = capsys.readouterr().out
    assert "conv13" in out and "detect" in out and "16,626 params" in out


def test_import_export_round_trip(tmp_path, capsys):
    art = tmp_path / "a.pt"
    names = tmp_path / "x.names"
    names.write_text("cat\ndog\n")
    assert main(["import-darknet", str(TINY_CFG), "--names", str(names), "--out", str(art)]) == 0
    assert main(["export", str(art), "--format", "darknet", "--out", str(tmp_path / "m")]) == 0
    art2 = tmp_path / "b.pt"
    assert main(["import-darknet", str(tmp_path / "m.cfg"), str(tmp_path / "m.weights"),
                 "--names", str(names), "--out", str(art2)]) == 0
    assert "loaded 9/9 conv layers" in capsys.readouterr().out


def _run(*args):
    return subprocess.run([sys.executable, "-m", "yolocompress.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_bad_inputs_are_one_line_errors_without_traceback(tmp_path):
    art = tmp_path / "a.pt"
    assert main(["import-darknet", str(TINY_CFG), "--classes", "2", "--out", str(art)]) == 0
    assert main(["export", str(art), "--format", "darknet", "--out", str(tmp_path / "m")]) == 0
    weights = tmp_path / "m.weights"
    weights.write_bytes(weights.read_bytes()[:-100])
    bad_cfg = tmp_path / "bad.cfg"
    bad_cfg.write_text(TINY_CFG.read_text().replace("layers = -1, 6", "layers = -1, 999"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(art.read_bytes()[:1000])
    cases = [
        (("import-darknet", str(tmp_path / "m.cfg"), str(weights), "--classes", "2", "--out",
          str(tmp_path / "x.pt")), "ends inside layer"),
        (("info", str(bad_cfg)), "layer 999"),
        (("info", str(corrupt)), "corrupt or truncated"),
    ]
    for args, needle in cases:
        r = _run(*args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_predict_writes_images_and_coco_results(tmp_path, capsys):
    import cv2
    import numpy as np
    art = tmp_path / "a.pt"
    assert main(["import-darknet", str(TINY_CFG), "--classes", "2", "--out", str(art)]) == 0
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"wide": (60, 120), "tall": (90, 40)}.items():
        cv2.imwrite(str(images / f"{name}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    out = tmp_path / "pred"
    for letterbox in ("--letterbox", "--no-letterbox"):
        assert main(["predict", str(art), str(images), "--out", str(out), "--conf-thresh", "0.0001",
                     letterbox]) == 0
        dets = json.loads((out / "detections.json").read_text())
        assert {d["image_id"] for d in dets} == {"wide", "tall"}
        for d in dets:
            x, y, w, h = d["bbox"]
            size = (120, 60) if d["image_id"] == "wide" else (40, 90)
            assert 0 <= x and 0 <= y and x + w <= size[0] + 1e-3 and y + h <= size[1] + 1e-3
            assert d["category_id"] in (0, 1) and 0 < d["score"] <= 1
        assert cv2.imread(str(out / "wide.jpg")).shape == (60, 120, 3)
    assert main(["predict", str(art), str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert "no such image" in capsys.readouterr().err
