"""Stage 2 benchmark: how long pruning takes (full YOLOv4 and the nano, random BN gammas, the
method's hand-set percents; target: < 5 s for yolov4 on CPU), CPU latency of the pruned structure
against its FLOPs reduction, and with `--sparse ARTIFACT` the demo numbers from `yolocompress
prune`: params/FLOPs reduction, mAP before and right after pruning (compensation on and off),
latency at batch 1 and 8 (target: latency reduction >= 0.9 x FLOPs reduction).

`--write` puts the tables, with the command line and the machine, in the `## Pruning` section of
docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from yolocompress.artifacts import load_artifact
from yolocompress.benchmarks import command_line, machine, run_script, write_section
from yolocompress.compress.groups import group_layers
from yolocompress.compress.prune import make_masks, prune
from yolocompress.config import PruneConfig, load_config
from yolocompress.eval.speed import measure_latency
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.profile import profile_blocks

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Pruning"
PERCENTS = PruneConfig().percents          # the method's hand-set YOLOv4 values


def _random_gammas(model: Darknet, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with |gamma| ~ U(0, 1) and beta ~ N(0, 0.1^2): no sparse structure."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if k.endswith("bn.weight"):
            v.copy_(torch.rand(v.shape, generator=g))
        elif k.endswith("bn.bias"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return sd


def _cost(blocks, size: int) -> tuple[int, int]:
    rows = profile_blocks(blocks, size, size)
    return sum(r.params for r in rows), sum(r.flops for r in rows)


def time_pruning(cfg: Path, size: int, repeats: int, seed: int = 0):
    """(row of the timing table, unpruned model, pruned model)."""
    model = Darknet(read_cfg(cfg))
    sd = _random_gammas(model, seed)
    model.load_state_dict(sd)
    t_masks, t_prune, t_build = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        keep = make_masks(model.blocks, sd, group_layers(model.blocks), PERCENTS)
        t1 = time.perf_counter()
        blocks, state = prune(model.blocks, sd, keep)
        t2 = time.perf_counter()
        pruned = Darknet(blocks)
        pruned.load_state_dict(state, strict=True)
        t3 = time.perf_counter()
        t_masks.append(t1 - t0)
        t_prune.append(t2 - t1)
        t_build.append(t3 - t2)
    (p0, f0), (p1, f1) = _cost(model.blocks, size), _cost(blocks, size)
    row = {"cfg": cfg.stem, "size": size, "convs": len(keep),
           "masks": statistics.median(t_masks), "prune": statistics.median(t_prune),
           "build": statistics.median(t_build), "params": (p0, p1), "flops": (f0, f1)}
    return row, model, pruned


def latency_rows(name: str, model, pruned, size: int, batches, iters: int, threads: int,
                 flops: tuple[int, int]) -> list[dict]:
    rows = []
    for b in batches:
        ms = [measure_latency(m, size, b, warmup=max(1, iters // 5), iters=iters,
                              threads=threads, fuse_bn=True)["ms_median"] for m in (model, pruned)]
        rows.append({"cfg": name, "batch": b, "threads": threads, "ms": ms,
                     "lat_red": 1 - ms[1] / ms[0], "flops_red": 1 - flops[1] / flops[0]})
    return rows


def _red(pair) -> str:
    return f"{1 - pair[1] / pair[0]:.1%}"


def _latency_table(rows) -> list[str]:
    out = ["| model | batch | threads | ms before (torch) | ms after (torch) | latency reduction | "
           "FLOPs reduction | ratio (target >= 0.9) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {r['cfg']} | {r['batch']} | {r['threads']} | {r['ms'][0]:.1f} | {r['ms'][1]:.1f} "
            f"| {r['lat_red']:.1%} | {r['flops_red']:.1%} | {r['lat_red'] / r['flops_red']:.2f} |"
            for r in rows]
    return out


def _stage1(art: dict) -> str:
    """How sparse the source is, from its stage-1 record (if it has one)."""
    rec = art.get("sparsity")
    if not rec:
        return "no stage-1 record"
    stats, nan = rec.get("stats", {}), float("nan")
    epochs = art["config"].get("train", {}).get("epochs", "?")
    return (f"stage 1: {epochs} epochs, schedule {rec.get('schedule')}, s {rec.get('s')}; "
            f"{stats.get('frac_below_1e-2', nan):.1%} of the penalised |gamma| below 1e-2, "
            f"mean |gamma| {stats.get('l1', nan):.3f}")


def demo(args, config, sparse_art: dict) -> list[str]:
    """Run `yolocompress prune` on the sparse artifact; its numbers as markdown lines."""
    from yolocompress.compress.prune_stage import run_prune

    with tempfile.TemporaryDirectory() as tmp:
        run_prune(config, args.sparse, Path(tmp) / "pruned.pt", latency_iters=args.iters,
                  latency_batches=(1, 8), latency_threads=args.threads)
        m = json.loads((Path(tmp) / "metrics.json").read_text())
    b, a, key = m["before"], m["after"], m["metric_key"]
    comp = m["compensation"]
    lines = [f"Demo: `{args.sparse}` ({m['source_stage']}; {_stage1(sparse_art)}), "
             f"{Path(args.config).name} at {m['img_size']} px, prune settings {m['settings']}; "
             f"pruning took {m['seconds']['masks'] + m['seconds']['prune']:.2f} s.", "",
             f"| params | BFLOPs | {key} before | after (compensated) | after (not compensated) |",
             "|---:|---:|---:|---:|---:|",
             f"| {b['params']:,} -> {a['params']:,} ({_red((b['params'], a['params']))} less) | "
             f"{b['flops'] / 1e9:.3f} -> {a['flops'] / 1e9:.3f} "
             f"({_red((b['flops'], a['flops']))} less) | {b[key]:.4f} | {comp['on'][key]:.4f} | "
             f"{comp['off'][key]:.4f} |", ""]
    rows = [{"cfg": "demo", "batch": lat["batch"], "threads": lat["after"]["threads"],
             "ms": [lat["before"]["ms_median"], lat["after"]["ms_median"]],
             "lat_red": 1 - lat["after"]["ms_median"] / lat["before"]["ms_median"],
             "flops_red": 1 - a["flops"] / b["flops"]} for lat in m["latency"]]
    return lines + _latency_table(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed pruning runs (median)")
    ap.add_argument("--iters", type=int, default=20, help="timed forward passes per latency")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing latency")
    ap.add_argument("--sparse", help="the demo's sparse artifact, e.g. runs/demo/sparse/best.pt")
    ap.add_argument("--config", default=str(ROOT / "cfg/experiments/demo.yaml"))
    ap.add_argument("overrides", nargs="*", help="config overrides for the --sparse run")
    ap.add_argument("--write", action="store_true", help=f"write to docs/BENCHMARKS.md ({SECTION})")
    args = ap.parse_args(argv)
    if args.sparse:                     # bad input fails now, not after minutes of timing
        config = load_config(args.config, args.overrides)
        sparse_art = load_artifact(args.sparse, check=False)

    timing, latency = [], []
    for cfg, size in ((ROOT / "cfg/models/yolov4.cfg", 416),
                      (ROOT / "cfg/models/yolov4-nano.cfg", 256)):
        row, model, pruned = time_pruning(cfg, size, args.repeats)
        timing.append(row)
        if cfg.stem == "yolov4-nano":           # yolov4 at batch 8 takes minutes per pass here
            latency += latency_rows(cfg.stem, model, pruned, size, (1, 8), args.iters,
                                    args.threads, row["flops"])
    table = ["| cfg | input | prunable convs | masks (s) | prune (s) | build + load (s) | params "
             "| BFLOPs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['cfg']} | {r['size']} | {r['convs']} | {r['masks']:.3f} | {r['prune']:.3f} | "
              f"{r['build']:.3f} | {r['params'][0] / 1e6:.2f} M -> {r['params'][1] / 1e6:.2f} M "
              f"({_red(r['params'])} less) | {r['flops'][0] / 1e9:.2f} -> "
              f"{r['flops'][1] / 1e9:.2f} ({_red(r['flops'])} less) |" for r in timing]
    demo_lines = demo(args, config, sparse_art) if args.sparse else [
        "Demo: pending: no sparse demo artifact was given. Run `yolocompress train` and "
        "`yolocompress sparse` with cfg/experiments/demo.yaml, then `python bench/bench_prune.py "
        "--sparse runs/demo/sparse/best.pt --write`."]
    text = "\n".join([
        SECTION, "", f"Command: `{command_line()}`.", "",
        f"Machine: {machine('torch')}. Shared with other jobs: treat times as indicative.", "",
        f"Pruning time: `make_masks` (group_layers + per-group thresholds) and `prune` (slicing + "
        f"compensation) on random BN gammas (U(0, 1), seed 0) with the method's hand-set percents "
        f"{', '.join(f'{p:g}' for p in PERCENTS)}; median of {args.repeats}. Target: yolov4 "
        f"masks + prune < 5 s.", "", *table, "",
        f"CPU latency of that pruned nano against its FLOPs reduction (median of {args.iters} "
        f"forward passes, raw head outputs; random gammas give a different structure than a "
        f"sparse model would).", "", *_latency_table(latency), "", *demo_lines, ""])
    print(text)
    if args.write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    run_script(main)
