#!/usr/bin/env bash
# The built-in demo, end to end on CPU: generate the demo data, train the small YOLOv4-topology
# baseline, evaluate it (VOC07 mAP@0.5), detect on a few validation images and export to ONNX.
# Re-running skips finished training (runs/demo/baseline/ is kept); pass --force to retrain.
set -euo pipefail
cd "$(dirname "$0")/.."
force=()
[[ "${1:-}" == "--force" ]] && force=(--force)

yolocompress data demo
yolocompress info cfg/models/yolov4-nano.cfg --img-size 256 | tail -n 1
yolocompress train --config cfg/experiments/demo.yaml "${force[@]}"
best=runs/demo/baseline/best.pt
yolocompress eval "$best" --data data/demo.yaml --plots runs/demo/baseline --json runs/demo/baseline/eval.json
root=$(python -c "from yolocompress.data.descriptor import load_descriptor; print(load_descriptor('data/demo.yaml').root)")
images=()
while read -r id; do images+=("$root/VOCdemo/JPEGImages/$id.jpg"); done \
  < <(head -n 8 "$root/VOCdemo/ImageSets/Main/val.txt")
yolocompress predict "$best" "${images[@]}" --out runs/demo/predictions
yolocompress export "$best" --format onnx --out runs/demo/baseline/model.onnx --check
