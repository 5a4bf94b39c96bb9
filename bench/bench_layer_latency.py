"""Channel + layer pruning against channel pruning alone at equal measured latency, after recovery
(issue 15's last acceptance line).

    python bench/bench_layer_latency.py --config cfg/experiments/bench-converged.yaml \
        --sparse runs/bench-converged/sparse/best.pt --layers 4 --budget 0.5 --seeds 0 1 2 \
        --out runs/layer-latency --json docs/bench/layer_latency.json --write

1. "channel + layer": the prune stage with `prune.layers=N` and `--budget` of the FLOPs
   (the units' FLOPs count toward it).
2. Its ONNX Runtime latency at batch 1 (`--threads`) against the sparse model's, `--rounds`
   interleaved rounds: the reduction r (kept in <out>/target.json, so a continued run aims at the
   same r).
3. "channel": the prune stage on the same sparse model with `prune.budget_target=latency` and
   `budget_ratio=r` (channels only, the latency table of the same backend and threads).
4. The three models (sparse, both pruned) exported and timed again side by side: the equal-latency
   check the rows report. Then each pruned model is recovered for every seed by `--recovery`
   (default: the config's pipeline.recovery; distill: from the sparse model; finetune: plain).

Every stage keeps its artifact under --out and is reused when complete, so a stopped run
continues. Latency needs a quiet machine: the rows record `uptime` before and after the timing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from yolocompress.artifacts import file_sha256, load_artifact
from yolocompress.bench.arms import arm_config, recover
from yolocompress.benchmarks import (add_result_args, command_line, machine, run_script,
                                     side_by_side_notes, time_side_by_side, uptime, write_result)
from yolocompress.compress.prune_stage import run_prune
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError
from yolocompress.fileio import atomic_open
from yolocompress.pipeline import score_artifact
from yolocompress.stages import recovery_stages

HEADING = "## Channel + layer pruning vs channel pruning at equal latency"
ARMS = ("channel + layer", "channel")


def _at(config, out: Path, folder: str, seed: int | None = None, **prune):
    """`config` writing under out/<folder>/ (train.seed `seed`), its prune section updated."""
    return dataclasses.replace(arm_config(config, out, folder, seed),
                               prune=dataclasses.replace(config.prune, **prune))


def _target(path: Path, sparse: Path, pruned: Path, size: int, args) -> float:
    """The channel + layer model's measured latency reduction against the sparse model, timed
    once and kept in `path` (with both artifacts' sha256), so that a continued run aims the
    channel-only arm at the same target and reuses its finished prune."""
    shas = {"sparse": file_sha256(sparse), "pruned": file_sha256(pruned)}
    if path.is_file():
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept.get("sha256") == shas:
            return kept["target"]
    ms = time_side_by_side({"sparse": sparse, "channel + layer": pruned}, size, args.threads,
                           args.rounds, args.iters)
    target = 1 - statistics.median(ms["channel + layer"]) / statistics.median(ms["sparse"])
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump({"sha256": shas, "target": target, "ms": ms, "uptime": uptime()}, f, indent=1)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sparse", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4, help="residual units the first arm removes")
    ap.add_argument("--budget", type=float, default=0.5, help="FLOPs share the first arm removes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recovery", choices=("distill", "finetune"), default=None,
                    help="default: the config's pipeline.recovery")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path, required=True)
    add_result_args(ap)
    args = ap.parse_args(argv)
    if args.layers < 1:
        raise YoloCompressError(f"--layers must be >= 1, got {args.layers}")
    config = load_config(args.config, args.overrides)
    recovery = args.recovery or config.pipeline.recovery
    size, out = config.model.img_size, args.out
    backend = {"latency_backend": "onnxruntime", "latency_threads": args.threads}
    pruned = {"channel + layer": run_prune(
        _at(config, out, "channel-layer", layers=args.layers, budget_target="flops",
            budget_ratio=args.budget, **backend),
        from_artifact=args.sparse, out=out / "channel-layer" / "pruned" / "best.pt",
        latency_iters=0)}
    target = _target(out / "target.json", args.sparse, pruned["channel + layer"], size, args)
    if not 0 < target < 1:
        raise YoloCompressError(f"{pruned['channel + layer']}: measured {target:.1%} less latency "
                                f"than the sparse model: no latency budget to match")
    print(f"channel + layer: {target:.1%} less ONNX Runtime latency; channel-only arm aims at it")
    pruned["channel"] = run_prune(
        _at(config, out, "channel", layers=0, budget_target="latency", budget_ratio=target,
            **backend),
        from_artifact=args.sparse, out=out / "channel" / "pruned" / "best.pt", latency_iters=0)
    timing = {"backend": "onnxruntime", "batch": 1, "threads": args.threads,
              "rounds": args.rounds, "iters": args.iters, "uptime_before": uptime()}
    ms = time_side_by_side({"sparse": args.sparse, **pruned}, size, args.threads, args.rounds,
                           args.iters)
    timing["uptime_after"] = uptime()
    ref = statistics.median(ms["sparse"])
    rows = []
    for arm in ARMS:
        art = load_artifact(pruned[arm])
        for seed in args.seeds:
            cfg = _at(config, out, f"{arm.replace(' + ', '-')}-seed{seed}", seed)
            best = recover(cfg, recovery, pruned[arm], args.sparse)
            row = score_artifact(cfg, recovery_stages()[recovery].name, best, latency_iters=0)
            rows.append({"arm": arm, "seed": seed, "units": [u["shortcut"] for u in
                                                             (art["prune"].get("units") or [])],
                         "map50_pruned": art["metrics"].get("map50_voc07"),
                         "map50_voc07": row["map50_voc07"], "flops": row["flops"],
                         "params": row["params"], "ms": ms[arm],
                         "latency_reduction": 1 - statistics.median(ms[arm]) / ref,
                         "epochs": load_artifact(best)["config"]["train"]["epochs"]})
            print(json.dumps(rows[-1]), flush=True)
    doc = {"command": command_line(),
           "sparse": str(args.sparse), "img_size": size, "recovery": recovery,
           "target_latency_reduction": target, "sparse_ms": ms["sparse"], "latency": timing,
           "rows": rows}
    with atomic_open(args.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    table = ["| arm | units removed | FLOPs | params | ONNX Runtime b1 ms | latency | right after "
             "pruning | after recovery (per seed) | mean ± sd |", "|---|---|---:|---:|---:|---:|"
             "---:|---|---:|"]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        maps = [r["map50_voc07"] for r in mine]
        sd = statistics.stdev(maps) if len(maps) > 1 else 0.0
        table.append(f"| {arm} | {len(mine[0]['units'])} | {mine[0]['flops'] / 1e9:.3f} G | "
                     f"{mine[0]['params']:,} | {statistics.median(mine[0]['ms']):.1f} | "
                     f"{-mine[0]['latency_reduction']:+.1%} | {mine[0]['map50_pruned']:.4f} | "
                     f"{' / '.join(f'{m:.4f}' for m in maps)} | {statistics.mean(maps):.4f} ± "
                     f"{sd:.4f} |")
    print("\n".join(table))
    if args.write:
        write_result(HEADING, f"sparse model {args.sparse}, recovery {recovery}, batch 1, "
                     + side_by_side_notes(timing, args.json),
                     machine("torch", "onnxruntime"), "\n".join(table), args.markdown)
    return 0


if __name__ == "__main__":
    run_script(main)
