#!/usr/bin/env bash
# The pipeline as sequential scripts (what `yolocompress pipeline --config X` does in one process):
# baseline -> sparse -> prune -> distill, each evaluated. Finished stages are skipped on re-runs.
#   bash scripts/run_pipeline.sh [cfg/experiments/demo.yaml] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-cfg/experiments/demo.yaml}
shift || true
runs=$(python -c "import sys; from yolocompress.config import load_config; from yolocompress.train.run import run_dir; print(run_dir(load_config(sys.argv[1], sys.argv[2:])))" "$config" "$@")
data=$(python -c "import sys; from yolocompress.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).require_file('data.descriptor'))" "$config" "$@")

# a shipped baseline (pipeline.baseline, as in the demo) is adopted instead of trained
python -c "import sys; from yolocompress.config import load_config; from yolocompress.pipeline import adopt_baseline; adopt_baseline(load_config(sys.argv[1], sys.argv[2:]))" "$config" "$@"
python scripts/train.py --config "$config" "$@"
python scripts/sparse_train.py --config "$config" --from "$runs/baseline/best.pt" "$@"
if [[ ! -f "$runs/pruned/metrics.json" ]]; then
  python scripts/prune.py --config "$config" --from "$runs/sparse/best.pt" --out "$runs/pruned/best.pt" "$@"
fi
python scripts/distill.py --config "$config" --student "$runs/pruned/best.pt" --teacher "$runs/sparse/best.pt" "$@"
for stage in baseline sparse pruned distilled; do
  echo "== $stage"
  python scripts/evaluate.py "$runs/$stage/best.pt" --data "$data" --json "$runs/$stage/eval.json" | tail -n 1
done
