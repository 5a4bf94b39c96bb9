#!/usr/bin/env bash
# The pipeline as sequential scripts (what `yolocompress pipeline --config X` does in one process):
# baseline -> sparse -> prune -> recovery (fine-tune, or distill with pipeline.recovery=distill),
# each evaluated. Finished stages are skipped on re-runs.
#   bash scripts/run_pipeline.sh [cfg/experiments/demo.yaml] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-cfg/experiments/demo.yaml}
shift || true
# one python start for the resolved config's paths and switches (importing torch takes
# seconds); the helper prints a YoloCompressError as one `error:` line, exit 2
helper() {    # helper settings|adopt STAGE, then the config and its overrides
  python - "$@" <<'PY'
import shlex, sys
from yolocompress.errors import YoloCompressError
try:
    from yolocompress.artifacts import file_sha256
    from yolocompress.config import load_config
    from yolocompress.pipeline import adopt_stage
    from yolocompress.stages import recovered_stage
    from yolocompress.train.run import run_dir
    if sys.argv[1] == "settings":
        c = load_config(sys.argv[2], sys.argv[3:])
        for k, v in {"runs": run_dir(c), "data": c.require_file("data.descriptor"),
                     "recovered": recovered_stage(c), "shipped_baseline": c.pipeline.baseline,
                     "shipped_sparse": c.pipeline.sparse}.items():
            print(f"{k}={shlex.quote(str(v or ''))}")
    else:   # adopt STAGE: a sparse model must descend from runs/<name>/baseline
        stage, c = sys.argv[2], load_config(sys.argv[3], sys.argv[4:])
        adopt_stage(c, stage, parent=None if stage == "baseline" else
                    file_sha256(run_dir(c) / "baseline" / "best.pt"))
except YoloCompressError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
PY
}
vars=$(helper settings "$config" "$@")
eval "$vars"

# a shipped baseline or sparse model (pipeline.baseline / pipeline.sparse, as in the demo) is
# adopted instead of trained
if [[ -n $shipped_baseline ]]; then helper adopt baseline "$config" "$@"
else python scripts/train.py --config "$config" "$@"; fi
if [[ -n $shipped_sparse ]]; then helper adopt sparse "$config" "$@"
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
