"""Does OpenCV's Darknet importer run an artifact's exported cfg + weights as we do? For each
artifact: `export_darknet`, cv2.dnn.readNetFromDarknet, and the max abs difference of every
detection conv's output (the raw [yolo] input) against ours on one random image, with our BN
eps (1e-5) and with OpenCV's (1e-6: the two differ where a BN running_var is ~1e-6).

    PYTHONPATH=<opencv 4.x>:. python bench/check_opencv_darknet.py runs/demo/pruned/best.pt ...

Prints one JSON line per artifact; exits 1 where this OpenCV has no Darknet importer (OpenCV 5).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from yolocompress.artifacts import build_model, load_artifact
from yolocompress.eval.speed import opencv_has_darknet
from yolocompress.export import export_darknet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    args = ap.parse_args(argv)
    import cv2
    if not opencv_has_darknet():
        print(f"OpenCV {cv2.__version__} has no Darknet importer", file=sys.stderr)
        return 1
    for path in args.artifacts:
        art = load_artifact(path)
        model = build_model(art, source=path).eval()
        h, w = art["input_size"]
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = model(x)
            for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.eps = 1e-6              # OpenCV's importer normalises with eps 1e-6
            ours_eps6 = model(x)
        with tempfile.TemporaryDirectory() as tmp:
            cfg, weights = export_darknet(art, Path(tmp) / "model")
            net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setInput(x.numpy())
        detect = [f"conv_{h.index - 1}" for h in model.heads]
        theirs = net.forward(detect)
        diff = [max(float((torch.from_numpy(t) - o).abs().max()) for t, o in zip(theirs, ref))
                for ref in (ours, ours_eps6)]
        scale = max(float(o.abs().max()) for o in ours)
        print(json.dumps({"artifact": path, "opencv": cv2.__version__, "layers": len(model.layers),
                          "detect_convs": detect, "max_abs_diff": diff[0],
                          "max_abs_diff_bn_eps_1e-6": diff[1], "max_abs_output": scale}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
