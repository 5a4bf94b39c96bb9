"""Layer pruning right after pruning: prune.layers = N residual units removed, alone or combined
with the experiment's channel budget, BN-recalibrated as the prune stage does; mAP, params,
FLOPs, and ONNX Runtime latency of the exported model.

    python bench/bench_layer_prune.py --sparse /tmp/ci/main/runs/demo/sparse/best.pt \
        --layers 0 2 4 6 --json docs/bench/layer_prune.json

Arms: for each N, "layers" (no channel pruning: prune.percents=[0], no budget) and "layers +
channels" (the config's prune section, e.g. the demo's 50 % params budget, which then counts the
units' params). Each pruned model is exported to ONNX (export_onnx's defaults) and timed in ONNX
Runtime at batch 1 with --threads intra-op threads, all arms in --rounds interleaved rounds (the
row keeps the median over rounds of each round's median), `uptime` recorded before and after;
latency_reduction is against the run's own unpruned row. Rows of another
`prune.layer_importance` already in --json are kept ("runs" holds each run's command, latency).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from yolocompress.artifacts import artifact_from_model, build_model, load_artifact
from yolocompress.benchmarks import command_line, run_script, uptime
from yolocompress.compress.prune import keep_from_record
from yolocompress.compress.prune_search import build_pruned
from yolocompress.compress.prune_stage import plan_from_config, remove_units_from_config
from yolocompress.config import load_config
from yolocompress.eval.speed import measure_latency_onnx
from yolocompress.export import export_onnx
from yolocompress.fileio import atomic_open
from yolocompress.models.profile import profile_summary
from bench_prune_right_after import setup

ROOT = Path(__file__).resolve().parents[1]


def _pruned(config, model, cal):
    """The prune stage's model for `config` (units, then channels, recalibrated) and its record."""
    base, units = remove_units_from_config(config, model, cal)
    _, record, _ = plan_from_config(config, base.blocks, base.state_dict(), cal, base,
                                    source=model.blocks if units else None)
    pruned = build_pruned(base.blocks, base.state_dict(), keep_from_record(base.blocks, record),
                          config.prune.compensate)
    return cal.recalibrate(pruned), units, record["budget"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "cfg/experiments/demo.yaml"))
    ap.add_argument("--sparse", required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 2, 4, 6])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    config = load_config(args.config, args.overrides)
    data, model, size, score, cal, base = setup(config, args.sparse)
    rows, onnx_dir = [], Path(tempfile.mkdtemp(prefix="layer_prune_"))
    for n in args.layers:
        for arm in ("layers", "layers + channels"):
            if arm == "layers" and n == 0:
                pc = dataclasses.replace(config.prune, layers=0, percents=(0.0,),
                                         budget_target=None)
                pruned = cal.recalibrate(build_model(load_artifact(args.sparse)))
                units, budget = [], None
            else:
                pc = dataclasses.replace(config.prune, layers=n) if arm != "layers" else \
                    dataclasses.replace(config.prune, layers=n, percents=(0.0,),
                                        budget_target=None)
                pruned, units, budget = _pruned(dataclasses.replace(config, prune=pc), model, cal)
            prof = profile_summary(pruned.blocks, size, size)
            path = export_onnx(artifact_from_model(pruned, "pruned", list(data.names),
                                                   input_size=[size, size]),
                               onnx_dir / f"{n}-{arm.replace(' + ', '-')}.onnx")
            row = {"arm": arm, "layers": n, "layer_importance": config.prune.layer_importance,
                   "units": [u["shortcut"] for u in units],
                   "budget": None if budget is None else {k: budget[k] for k in
                                                          ("metric", "target", "reduction")},
                   "map50_voc07": score(pruned)["map50_voc07"], "params": prof["params"],
                   "flops": prof["flops"], "params_reduction": 1 - prof["params"] / base["params"],
                   "flops_reduction": 1 - prof["flops"] / base["flops"], "onnx": str(path),
                   "ms": []}
            print(json.dumps({k: v for k, v in row.items() if k != "ms"}), flush=True)
            rows.append(row)
    doc = {"command": command_line(),
           "sparse": args.sparse, "img_size": size, "base": base,
           "latency": {"backend": "onnxruntime", "batch": 1, "threads": args.threads,
                       "iters": args.iters, "rounds": args.rounds, "uptime_before": uptime()}}
    for _ in range(args.rounds):
        for row in rows:
            row["ms"].append(measure_latency_onnx(row["onnx"], size, 1, warmup=3, iters=args.iters,
                                                  threads=args.threads)["ms_median"])
    doc["latency"]["uptime_after"] = uptime()
    ref = next(r for r in rows if r["layers"] == 0 and r["arm"] == "layers")
    ref_ms = statistics.median(ref["ms"])
    for row in rows:
        row["ms_median"] = statistics.median(row["ms"])
        row["latency_reduction"] = 1 - row["ms_median"] / ref_ms
        row["latency_per_flops"] = (row["latency_reduction"] / row["flops_reduction"]
                                    if row["flops_reduction"] else None)
        del row["onnx"]
        print(json.dumps(row), flush=True)
    out = Path(args.json)
    importance = config.prune.layer_importance
    doc["rows"], doc["runs"] = rows, {importance: {k: doc[k] for k in ("command", "latency")}}
    if out.exists():            # rows of another layer_importance stay, with their own run's info
        old = json.loads(out.read_text())
        for r in old["rows"]:   # files written before rows named their importance: the default
            r.setdefault("layer_importance", "bn_gamma_mean")
        runs = old.get("runs") or {old["rows"][0]["layer_importance"]:
                                   {k: old[k] for k in ("command", "latency")}}
        doc["rows"] = [r for r in old["rows"] if r["layer_importance"] != importance] + rows
        doc["runs"] = {**{k: v for k, v in runs.items() if k != importance}, **doc["runs"]}
    with atomic_open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    run_script(main)
