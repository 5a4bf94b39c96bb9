#!/usr/bin/env bash
# The built-in demo, end to end on CPU: generate the demo data, run the compression pipeline
# (baseline -> sparse -> prune -> fine-tune -> INT8 ONNX, the baseline adopted from the shipped
# cfg/experiments/demo-baseline.pt), then detect on a few validation images with the final model
# and export it to ONNX and to Darknet cfg + weights.
# Re-running skips finished stages (runs/demo/ is kept); pass --force to run every stage again.
set -euo pipefail
cd "$(dirname "$0")/.."
force=()
[[ "${1:-}" == "--force" ]] && force=(--force)

yolocompress data demo
yolocompress pipeline --config cfg/experiments/demo.yaml "${force[@]}"
final=runs/demo/finetuned/best.pt   # the recovered model (distilled/ with pipeline.recovery=distill)
root=$(python -c "from yolocompress.data.descriptor import load_descriptor; print(load_descriptor('data/demo.yaml').root)")
images=()
while read -r id; do images+=("$root/VOCdemo/JPEGImages/$id.jpg"); done \
  < <(head -n 8 "$root/VOCdemo/ImageSets/Main/val.txt")
yolocompress predict "$final" "${images[@]}" --out runs/demo/predictions
yolocompress export "$final" --format onnx --out runs/demo/finetuned/model.onnx --check
yolocompress export "$final" --format darknet --out runs/demo/finetuned/yolov4-nano-pruned
echo "report: runs/demo/report.md"
