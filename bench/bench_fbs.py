"""FBS dynamic channel gating against static group pruning at the same average MACs.

    nice -n 10 python bench/bench_fbs.py --baseline cfg/experiments/demo-baseline.pt \
        --densities 0.5 0.75 0.35 --seeds 0 1 --json docs/bench/fbs.json

Per seed and density: `yolocompress gate` from the baseline (gate.density=d, gate.steps /
gate.lr = distill.steps / distill.lr), its executed MACs per image averaged over the val split
(gate_stage.measure_artifact); then the static arm: our prune stage on the same baseline with
prune.budget_target=flops at the FLOPs share those MACs remove, fine-tuned (`finetune`) for the
same steps and lr. Runs live in <root>/<fbs-d0.5-seed0 | static-d0.5 | static-d0.5-seed0>/ and a
finished run with the same recorded inputs is reused (the stages' skip rule). Latency: torch, 1
thread, batch 1, median of --latency-iters: the FBS model with the kept channels gathered
(gating.gathered_model), the FBS model masking densely computed channels, the pruned model and
the baseline, all BN-folded. Rows are written to --json after every run (a row with the same
method, density and seed is replaced).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from yolocompress.artifacts import build_model, load_artifact
from yolocompress.benchmarks import command_line
from yolocompress.bench.arms import arm_config
from yolocompress.compress.distill_stage import run_finetune
from yolocompress.compress.gate_stage import measure_artifact, run_gate
from yolocompress.compress.gating import gathered_model
from yolocompress.compress.prune_stage import run_prune
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError
from yolocompress.eval.speed import measure_latency
from yolocompress.fileio import atomic_open
from yolocompress.models.profile import profile_summary
from yolocompress.train.run import config_evaluator, load_data, uses_letterbox

ROOT = Path(__file__).resolve().parents[1]


def _latency(model, size: int, iters: int, gather: bool = False) -> float:
    m = gathered_model(model) if gather else model
    return measure_latency(m, size, 1, warmup=max(1, iters // 5), iters=iters, threads=1,
                           fuse_bn=not gather)["ms_median"]


def _save(out: Path, doc: dict, row: dict) -> None:
    key = (row["method"], row["density"], row["seed"])
    doc["rows"] = [r for r in doc["rows"] if (r["method"], r["density"], r["seed"]) != key] + [row]
    with atomic_open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "cfg/experiments/demo.yaml"))
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.75, 0.35])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--root", default="runs/bench-fbs")
    ap.add_argument("--latency-iters", type=int, default=30)
    ap.add_argument("--latency-size", type=int, default=None,
                    help="input side of the latency runs (default: model.img_size)")
    ap.add_argument("--json", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    config = load_config(args.config, args.overrides)
    # the FBS stage trains as long, and at the lr, as the static arm's fine-tune
    config = dataclasses.replace(config, gate=dataclasses.replace(
        config.gate, steps=config.distill.steps, epochs=config.distill.epochs,
        lr=config.distill.lr, optimizer=config.distill.optimizer))
    root, size = Path(args.root).resolve(), config.model.img_size
    lat_size = args.latency_size or size
    baseline = Path(args.baseline).resolve()
    base_model = build_model(load_artifact(baseline), source=str(baseline))
    data = load_data(config)
    out = Path(args.json)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": []}
    doc["command"] = command_line()
    doc["baseline"] = {
        "artifact": str(args.baseline),
        "map50_voc07": config_evaluator(config, data.val, data.names, uses_letterbox(
            config, base_model))(base_model)["map50_voc07"],      # at this config's img_size
        "macs": profile_summary(base_model.blocks, size, size)["flops_conv"] // 2,
        "latency_ms_b1": _latency(base_model, lat_size, args.latency_iters)}
    doc["latency"] = {"backend": "torch", "threads": 1, "batch": 1, "img_size": lat_size,
                      "iters": args.latency_iters, "statistic": "median", "bn": "folded"}
    doc["training"] = {"steps": config.distill.steps, "lr": config.distill.lr,
                       "batch_size": config.train.batch_size, "img_size": size}
    for seed in args.seeds:
        for d in args.densities:
            tag = f"d{d:g}"
            cfg = arm_config(dataclasses.replace(config, gate=dataclasses.replace(
                config.gate, density=d)), root, f"fbs-{tag}-seed{seed}", seed)
            best = run_gate(cfg, from_artifact=baseline)
            res = measure_artifact(cfg, best)
            gated = build_model(load_artifact(best), source=str(best))
            _save(out, doc, {
                "method": "fbs", "density": d, "seed": seed, "macs": res["macs_mean"],
                "macs_sd": res["macs_sd"], "macs_dense": res["macs_dense"],
                "map50_voc07": load_artifact(best)["metrics"]["map50_voc07"],
                "latency_ms_b1": _latency(gated, lat_size, args.latency_iters, gather=True),
                "latency_ms_b1_masked": _latency(gated, lat_size, args.latency_iters),
                "artifact": str(best)})
            # static: our prune stage (group percents searched greedily from prune.percents, as
            # the benchmark's "ours" arm) removing the FLOPs share the gating saves on average
            fbs0 = next(r for r in doc["rows"] if r["method"] == "fbs" and r["density"] == d
                        and r["seed"] == args.seeds[0])
            budget = round(1 - fbs0["macs"] / fbs0["macs_dense"], 4)
            pcfg = arm_config(dataclasses.replace(config, prune=dataclasses.replace(
                config.prune, budget_target="flops", budget_ratio=budget)), root, f"static-{tag}")
            try:
                pruned = run_prune(pcfg, from_artifact=baseline,
                                   out=root / f"static-{tag}" / "pruned" / "best.pt",
                                   latency_iters=0)
            except YoloCompressError as e:    # e.g. a budget the prune limits cannot reach
                print(f"static {tag}: not run: {e}", flush=True)
                continue
            fbest = run_finetune(arm_config(config, root, f"static-{tag}-seed{seed}", seed), pruned)
            static = build_model(load_artifact(fbest), source=str(fbest))
            _save(out, doc, {
                "method": "static", "density": d, "seed": seed,
                "macs": profile_summary(static.blocks, size, size)["flops_conv"] // 2,
                "macs_dense": fbs0["macs_dense"], "flops_budget": budget,
                "map50_voc07": load_artifact(fbest)["metrics"]["map50_voc07"],
                "map50_voc07_pruned": load_artifact(pruned)["metrics"].get("map50_voc07"),
                "latency_ms_b1": _latency(static, lat_size, args.latency_iters),
                "artifact": str(fbest)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
