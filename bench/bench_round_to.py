"""What `prune.round_to` buys: the same sparse model pruned to the same FLOPs budget with kept
channel counts rounded up to multiples of 1 / 8 / 16, timed side by side in ONNX Runtime.

    python bench/bench_round_to.py --config cfg/experiments/bench-converged.yaml \
        --sparse runs/bench-converged/sparse/best.pt --budget 0.5 --round-to 1 8 16 \
        --out runs/round-to --json docs/bench/round_to.json --write

Each arm is the prune stage with the experiment's settings, `prune.budget_target=flops`,
`prune.budget_ratio=--budget` and `prune.round_to=r` (the search prices the rounded counts, so
every arm lands on the same FLOPs); its mAP right after pruning is the stage's (BN recalibrated,
no training). The sparse model and the pruned ones are exported and timed in `--rounds`
interleaved rounds per batch size; a row reports its median over the rounds. Finished prunes are
reused; latency needs a quiet machine (the JSON records `uptime` before and after).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from yolocompress.artifacts import load_artifact
from yolocompress.bench.arms import arm_config
from yolocompress.benchmarks import (add_result_args, command_line, machine, run_script,
                                     side_by_side_notes, time_side_by_side, uptime, write_result)
from yolocompress.compress.prune_stage import run_prune
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError
from yolocompress.fileio import atomic_open
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.profile import profile_summary

HEADING = "## What prune.round_to buys"


def _channels(art: dict) -> list[int]:
    """Filters of every conv of an artifact's cfg, in order."""
    return [b.get_int("filters") for b in parse_cfg(art["cfg"]) if b.type == "convolutional"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sparse", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=0.5, help="FLOPs share every arm removes")
    ap.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path, required=True)
    add_result_args(ap)
    args = ap.parse_args(argv)
    if not args.round_to or min(args.round_to) < 1 or len(set(args.round_to)) != len(args.round_to):
        raise YoloCompressError(f"--round-to must be distinct ints >= 1, got {args.round_to}")
    if not 0 < args.budget < 1:
        raise YoloCompressError(f"--budget must be in (0, 1), got {args.budget}")
    if min(args.batches) < 1:
        raise YoloCompressError(f"--batches must be >= 1, got {args.batches}")
    config = load_config(args.config, args.overrides)
    size = config.model.img_size
    pruned = {}
    for r in args.round_to:
        cfg = arm_config(config, args.out, f"round{r}")
        cfg = dataclasses.replace(cfg, prune=dataclasses.replace(
            config.prune, round_to=r, budget_target="flops", budget_ratio=args.budget))
        pruned[r] = run_prune(cfg, from_artifact=args.sparse,
                              out=args.out / f"round{r}" / "pruned" / "best.pt", latency_iters=0)
    timing = {"backend": "onnxruntime", "threads": args.threads, "rounds": args.rounds,
              "iters": args.iters, "uptime_before": uptime()}
    models = {"sparse": args.sparse, **{f"round_to {r}": p for r, p in pruned.items()}}
    ms = {b: time_side_by_side(models, size, args.threads, args.rounds, args.iters, batch=b)
          for b in args.batches}
    timing["uptime_after"] = uptime()
    sparse_flops = profile_summary(parse_cfg(load_artifact(args.sparse)["cfg"]), size)["flops"]
    rows = []
    for r, path in pruned.items():
        art = load_artifact(path)
        chans = _channels(art)
        flops = profile_summary(parse_cfg(art["cfg"]), size)["flops"]
        row = {"round_to": r, "flops": flops, "params": art["metrics"].get("params"),
               "flops_reduction": 1 - flops / sparse_flops,
               "map50_pruned": art["metrics"].get("map50_voc07"),
               "convs_multiple_of_8": sum(c % 8 == 0 for c in chans), "convs": len(chans)}
        for b in args.batches:
            med, ref = statistics.median(ms[b][f"round_to {r}"]), statistics.median(ms[b]["sparse"])
            row[f"ms_b{b}"] = ms[b][f"round_to {r}"]
            row[f"latency_reduction_b{b}"] = 1 - med / ref
            row[f"latency_over_flops_b{b}"] = (1 - med / ref) / row["flops_reduction"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"command": command_line(),
           "sparse": str(args.sparse), "img_size": size, "budget": args.budget,
           "sparse_ms": {f"b{b}": ms[b]["sparse"] for b in args.batches}, "latency": timing,
           "rows": rows}
    with atomic_open(args.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    cols = "".join(f" b{b} ms | b{b} latency |" for b in args.batches)
    table = [f"| round_to | FLOPs | convs with a multiple of 8 |{cols} latency / FLOPs (b1) | "
             "mAP right after pruning |",
             "|---:|---:|---:|" + "---:|---:|" * len(args.batches) + "---:|---:|"]
    table.append(f"| sparse (unpruned) | {sparse_flops / 1e9:.3f} G | | " + "".join(
        f"{statistics.median(ms[b]['sparse']):.2f} | | " for b in args.batches) + "| |")
    for row in rows:
        cells = "".join(f"{statistics.median(row[f'ms_b{b}']):.2f} | "
                        f"{-row[f'latency_reduction_b{b}']:+.1%} | " for b in args.batches)
        ratio = row.get("latency_over_flops_b1")
        table.append(f"| {row['round_to']} | {row['flops'] / 1e9:.3f} G "
                     f"({-row['flops_reduction']:+.1%}) | {row['convs_multiple_of_8']} of "
                     f"{row['convs']} | {cells}{'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{row['map50_pruned']:.4f} |")
    print("\n".join(table))
    if args.write:
        write_result(HEADING, f"sparse model {args.sparse}, {size} px, batches {args.batches}, "
                     + side_by_side_notes(timing, args.json),
                     machine("torch", "onnxruntime"), "\n".join(table), args.markdown)
    return 0


if __name__ == "__main__":
    run_script(main)
