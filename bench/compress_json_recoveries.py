"""Bring a `bench compress --json` file written before `pipeline.recovery` to the current form.

Before, the `ours` arm always recovered by attention distillation; now it follows
`pipeline.recovery` (fine-tuning by default) and distillation is the `ours_distill` arm. So: every
row gets the `recovery` it ran (ours and ours_iterative: distill; scratch: scratch; the others:
finetune), the old `ours` rows become `ours_distill`, and, where `--recovery finetune` (the
experiment's pipeline.recovery), each `ours_finetune` row is also the new `ours` row: the same
pruned model, the same fine-tune, the same run. The file gets `recoveries` (what each method is
recovered by) and its paired comparisons again. The file is replaced atomically.

    python bench/compress_json_recoveries.py docs/bench/compress.json --recovery finetune
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yolocompress.bench.suites import _row_key, paired_rows  # noqa: E402
from yolocompress.fileio import atomic_open  # noqa: E402
from yolocompress.stages import ARMS  # noqa: E402

# what each method was recovered by before pipeline.recovery
BEFORE = {"ours": "distill", "ours_iterative": "distill", "scratch": "scratch"}


def migrate(data: dict, recovery: str) -> dict:
    if "recoveries" in data:
        raise SystemExit("error: the file records `recoveries` already: nothing to migrate")
    rows = []
    for r in data["rows"]:
        ran = BEFORE.get(r["method"], "finetune")
        rows.append({**r, "method": "ours_distill" if r["method"] == "ours" else r["method"],
                     "recovery": ran})
    if recovery == "finetune":
        rows += [{**r, "method": "ours"} for r in rows if r["method"] == "ours_finetune"]
    else:
        rows += [{**r, "method": "ours"} for r in rows if r["method"] == "ours_distill"]
    rows.sort(key=_row_key)
    recoveries = {name: recovery if arm.recovery == "pipeline" else arm.recovery
                  for name, arm in ARMS.items()}
    return {**data, "recoveries": recoveries, "rows": rows, "paired": paired_rows(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--recovery", choices=("finetune", "distill"), required=True,
                    help="the experiment's pipeline.recovery")
    args = ap.parse_args()
    out = migrate(json.loads(args.json.read_text(encoding="utf-8")), args.recovery)
    with atomic_open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print(f"{args.json}: {len(out['rows'])} rows; methods "
          f"{sorted({r['method'] for r in out['rows']})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
