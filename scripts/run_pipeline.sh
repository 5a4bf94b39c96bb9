#!/usr/bin/env bash
# The pipeline as sequential scripts (what `yolocompress pipeline --config X` does in one process):
# baseline -> sparse -> prune -> recovery (fine-tune, or distill with pipeline.recovery=distill),
# each evaluated. Finished stages are skipped on re-runs.
#   bash scripts/run_pipeline.sh [cfg/experiments/demo.yaml] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-cfg/experiments/demo.yaml}
shift || true
setting() {   # setting EXPR [key=value ...]: EXPR of the resolved config `c`
  local expr=$1
  shift
  python -c "import sys; from yolocompress.config import load_config; from yolocompress.train.run import run_dir; from yolocompress.stages import recovered_stage; c = load_config(sys.argv[1], sys.argv[2:]); print($expr or '')" "$config" "$@"
}
runs=$(setting "run_dir(c)" "$@")
data=$(setting "c.require_file('data.descriptor')" "$@")
recovered=$(setting "recovered_stage(c)" "$@")

# a shipped baseline or sparse model (pipeline.baseline / pipeline.sparse, as in the demo) is
# adopted instead of trained
adopt() {     # adopt STAGE [key=value ...]; a sparse model must descend from runs/<name>/baseline
  python -c "import sys; from yolocompress.config import load_config; from yolocompress.artifacts import file_sha256; from yolocompress.pipeline import adopt_stage; from yolocompress.train.run import run_dir; c = load_config(sys.argv[2], sys.argv[3:]); adopt_stage(c, sys.argv[1], parent=None if sys.argv[1] == 'baseline' else file_sha256(run_dir(c) / 'baseline' / 'best.pt'))" "$1" "$config" "${@:2}"
}
if [[ -n $(setting "c.pipeline.baseline" "$@") ]]; then adopt baseline "$@"
else python scripts/train.py --config "$config" "$@"; fi
if [[ -n $(setting "c.pipeline.sparse" "$@") ]]; then adopt sparse "$@"
else python scripts/sparse_train.py --config "$config" --from "$runs/baseline/best.pt" "$@"; fi
if [[ ! -f "$runs/pruned/metrics.json" ]]; then
  python scripts/prune.py --config "$config" --from "$runs/sparse/best.pt" --out "$runs/pruned/best.pt" "$@"
fi
if [[ $recovered == distilled ]]; then
  python scripts/distill.py --config "$config" --student "$runs/pruned/best.pt" --teacher "$runs/sparse/best.pt" "$@"
else
  yolocompress finetune --config "$config" --student "$runs/pruned/best.pt" "$@"
fi
for stage in baseline sparse pruned "$recovered"; do
  echo "== $stage"
  python scripts/evaluate.py "$runs/$stage/best.pt" --data "$data" --json "$runs/$stage/eval.json" | tail -n 1
done
