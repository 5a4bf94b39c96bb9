"""Right after pruning: mAP of a sparse model pruned to FLOPs budgets, no training, as is and
BN-recalibrated, per prune setting, against Torch-Pruning.

    python bench/bench_prune_right_after.py --sparse runs/demo/sparse/best.pt --budgets 0.5 0.65 \
        --arms ours ours:importance=bn_gamma_norm,merge=mean tp --json docs/bench/prune_right_after.json

An arm is `ours[:key=value,...]` (the experiment's prune section with those prune.* keys
replaced; the budget search starts from zero percents) or `tp` (Torch-Pruning, BN-scale, global).
`--reconstruct N ...`: each `ours` arm's pruned model is also scored after least-squares
reconstruction (compress/reconstruct.py) on the first N of the recalibration images, as the arm
`<arm>+reconstruct=N` (one search per arm).
Every pruned model is scored on the val split as is and after recalibrate_bn over the
experiment's `prune.recalibrate` training images; rows are appended to --json (an existing row
with the same arm and budget is replaced), with the seconds each search took.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from yolocompress.artifacts import build_model, load_artifact
from yolocompress.benchmarks import command_line
from yolocompress.compress.prune_search import Calibrated
from yolocompress.compress.recalibrate import recalibrate_bn
from yolocompress.compress.reconstruct import reconstruct
from yolocompress.compress.tp_baseline import tp_prune
from yolocompress.config import load_config
from yolocompress.fileio import atomic_open
from yolocompress.models.profile import profile_summary
from yolocompress.train.run import config_evaluator, load_data, uses_letterbox

ROOT = Path(__file__).resolve().parents[1]


def setup(config, sparse: str):
    """(data splits, the sparse model, input size, val scorer, calibration subsets, the model's
    profile_summary) for a right-after-pruning measurement of `sparse` under `config`."""
    data = load_data(config)
    model = build_model(load_artifact(sparse), source=sparse)
    size = config.model.img_size
    letterbox = uses_letterbox(config, model)
    return (data, model, size, config_evaluator(config, data.val, data.names, letterbox),
            Calibrated.from_config(config, data.train, letterbox, data.names),
            profile_summary(model.blocks, size, size))


def arm_config(path: str, overrides: list[str], arm: str):
    """The experiment with the arm's prune.* keys replaced (`ours:key=value,...`)."""
    name, _, keys = arm.partition(":")
    if name != "ours":
        raise SystemExit(f"error: unknown arm {arm!r} (ours[:key=value,...] or tp)")
    return load_config(path, [*overrides, *(f"prune.{kv}" for kv in keys.split(",") if kv)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "cfg/experiments/demo.yaml"))
    ap.add_argument("--sparse", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.65])
    ap.add_argument("--arms", nargs="+", default=["ours:bn_gamma_abs:importance", "tp"])
    ap.add_argument("--json", required=True)
    ap.add_argument("--reconstruct", type=int, nargs="*", default=[],
                    help="also score each ours arm reconstructed on this many images")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    config = load_config(args.config, args.overrides)
    data, model, size, score, cal, base = setup(config, args.sparse)
    out = Path(args.json)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": []}
    doc["command"] = command_line()
    doc["sparse"] = {"map50_voc07": score(model)["map50_voc07"],
                     "recalibrated": score(recalibrate_bn(build_model(load_artifact(args.sparse)),
                                                          cal.full))["map50_voc07"]}
    print(f"sparse: {doc['sparse']}", flush=True)
    reference = recalibrate_bn(build_model(load_artifact(args.sparse)), cal.full) \
        if args.reconstruct else None

    def add(row: dict) -> None:
        print(json.dumps(row), flush=True)
        doc["rows"] = [r for r in doc["rows"]
                       if (r["arm"], r["budget"]) != (row["arm"], row["budget"])] + [row]
        with atomic_open(out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)

    for budget in args.budgets:
        for arm in args.arms:
            t0 = time.perf_counter()
            keep = None
            if arm == "tp":
                pruned, _ = tp_prune(model, budget, size, importance="bn_scale")
            else:
                pruned, keep = cal.prune_to_budget(
                    model, arm_config(args.config, args.overrides, arm), budget)
            seconds = time.perf_counter() - t0
            prof = profile_summary(pruned.blocks, size, size)
            plain = copy.deepcopy(pruned)
            as_is = score(pruned)["map50_voc07"]
            recal = score(recalibrate_bn(pruned, cal.full))["map50_voc07"]
            cost = {"flops_reduction": 1 - prof["flops"] / base["flops"],
                    "params_reduction": 1 - prof["params"] / base["params"]}
            add({"arm": arm, "budget": budget, "map50_voc07": as_is,
                 "map50_voc07_recalibrated": recal, **cost, "search_seconds": seconds})
            for n in args.reconstruct if keep is not None else ():
                m, t1 = copy.deepcopy(plain), time.perf_counter()
                reconstruct(reference, m, keep, cal.full.head(n), progress=False)
                add({"arm": f"{arm}+reconstruct={n}", "budget": budget,
                     "map50_voc07": score(m)["map50_voc07"],
                     "map50_voc07_recalibrated": score(recalibrate_bn(m, cal.full))["map50_voc07"],
                     **cost, "search_seconds": seconds,
                     "reconstruct_seconds": time.perf_counter() - t1})
    return 0


if __name__ == "__main__":
    sys.exit(main())
