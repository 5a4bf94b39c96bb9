"""`yolocompress bench compress` and `yolocompress bench ablation`: the arms of bench/arms.py
over the experiment's `bench` section, from the experiment's own baseline and sparse stages
(run first when missing). Results: runs/<name>/bench/{compress,ablation}.json, a docs/BENCHMARKS.md
section each (with the command and the machine) and, for compress, an mAP-vs-FLOPs plot.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..artifacts import load_artifact
from ..benchmarks import BENCHMARKS_MD, machine, write_result
from ..config import Config
from ..errors import YoloCompressError
from ..fileio import atomic_open
from ..pipeline import run_to_sparse, score_artifact
from ..plotting import new_figure, save_figure
from ..train.run import load_data, run_dir
from .arms import ARMS, arm_config, prune_arm, recovery_epochs, run_arm

__all__ = ["mean_sd", "paired", "compress_plan", "run_compress", "merge_published",
           "check_joinable", "run_ablation", "COMPRESS_HEADING", "ABLATION_HEADING"]

COMPRESS_HEADING = "## Compression vs peers at equal FLOPs"
ABLATION_HEADING = "## Ablation: what each part of the method buys"


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value): the `mean ± sd` over seeds."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b paired by index (seed): mean, sd and the paired t statistic (None below 2 pairs or
    for a zero spread)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    mean, sd = mean_sd(d)
    t = mean / (sd / math.sqrt(len(d))) if len(d) > 1 and sd > 0 else None
    return {"n": len(d), "mean": mean, "sd": sd, "t": t}


def _pm(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_sd(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _command(kind: str, config: Config) -> str:
    args = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name in ("yolocompress", "cli.py") \
        else ["bench", kind, "--config", str(config.source)]
    return shlex.join(["yolocompress", *args])


def _save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _reference(config: Config, paths: dict, latency_iters: int) -> list[dict]:
    return [score_artifact(config, stage, paths[stage], latency_iters)
            for stage in ("baseline", "sparse")]


def _group(rows: Sequence[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _label(row: dict) -> str:
    """The method's label; for an arm that follows pipeline.recovery, with the recovery it ran."""
    arm = ARMS[row["method"]]
    return f"{arm.label}: {row['recovery']}" if arm.recovery == "pipeline" else arm.label


def compress_table(rows: Sequence[dict], reference: Sequence[dict]) -> str:
    """Markdown: one line per (budget, method), seeds pooled as mean ± sd."""
    base = reference[0]
    lines = ["| FLOPs budget | method | FLOPs | params | mAP@0.5 VOC07 pruned | after recovery | "
             "all-point | epochs | CPU ms (b1) | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reference:
        lines.append(f"| - | {r['stage']} (unpruned) | {r['flops'] / 1e9:.3f}G | "
                     f"{r['params'] / 1e6:.3f}M | - | {r['map50_voc07']:.3f} | "
                     f"{r['map50_all']:.3f} | - | {r['latency_ms_b1'] or float('nan'):.1f} | - |")
    for (budget, method), group in sorted(_group(rows, "budget", "method").items(),
                                          key=lambda kv: (kv[0][0], list(ARMS).index(kv[0][1]))):
        r = group[0]
        pruned = [g["map50_pruned"] for g in group if g["map50_pruned"] is not None]
        lines.append(
            f"| -{budget:.0%} | {_label(r)} | {r['flops'] / 1e9:.3f}G "
            f"({r['flops'] / base['flops'] - 1:+.1%}) | {r['params'] / 1e6:.3f}M "
            f"({r['params'] / base['params'] - 1:+.1%}) | {_pm(pruned) if pruned else '-'} | "
            f"{_pm([g['map50_voc07'] for g in group])} | {_pm([g['map50_all'] for g in group])} | "
            f"{r['epochs']} | "
            f"{_pm([g['latency_ms_b1'] for g in group if g['latency_ms_b1']] or [math.nan], 1)} | "
            f"{len(group)} |")
    return "\n".join(lines)


PEER = "torch_pruning"


def paired_rows(rows: Sequence[dict], peer: str = PEER) -> list[dict]:
    """Every method minus `peer` at each budget, mAP@0.5 VOC07 paired by seed (the seeds both
    ran)."""
    out = []
    for (budget, method), group in _group(rows, "budget", "method").items():
        theirs = {r["seed"]: r["map50_voc07"] for r in rows
                  if r["budget"] == budget and r["method"] == peer}
        mine = {r["seed"]: r["map50_voc07"] for r in group}
        seeds = sorted(set(mine) & set(theirs))
        if method == peer or not seeds:
            continue
        out.append({"budget": budget, "method": method, "vs": peer, "seeds": seeds,
                    **paired([mine[s] for s in seeds], [theirs[s] for s in seeds])})
    return sorted(out, key=lambda d: (d["budget"], list(ARMS).index(d["method"])))


def paired_table(pairs: Sequence[dict]) -> str:
    lines = ["| FLOPs budget | method | minus Torch-Pruning (mAP@0.5 points, paired by seed) | "
             "paired t | seeds |", "|---|---|---|---|---|"]
    for d in pairs:
        t = "-" if d["t"] is None else f"{d['t']:+.1f}"
        lines.append(f"| -{d['budget']:.0%} | {ARMS[d['method']].label} | "
                     f"{100 * d['mean']:+.1f} ± {100 * d['sd']:.1f} | {t} | {d['n']} |")
    return "\n".join(lines)


def plot_compress(rows: Sequence[dict], reference: Sequence[dict], path: Path) -> Path:
    """mAP@0.5 (VOC07, mean over seeds) vs FLOPs, one line per method, the unpruned models as
    points."""
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    for method, group in _group(rows, "method").items():
        pts = sorted((g[0]["flops"] / 1e9, float(np.mean([x["map50_voc07"] for x in g])))
                     for g in _group(group, "budget").values())
        ax.plot(*zip(*pts), marker="o", label=_label(group[0]))
    for r in reference:
        ax.scatter([r["flops"] / 1e9], [r["map50_voc07"]], marker="*", s=120, label=r["stage"])
    ax.set_xlabel("GFLOPs at the experiment's input size")
    ax.set_ylabel("mAP@0.5 (VOC07 11-point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# what docs/bench/compress.json keeps of a row (the run folder's compress.json has all of it)
PUBLISHED = ("budget", "method", "recovery", "seed", "stage", "map50_voc07", "map50_pruned",
             "map50_all", "flops", "params", "latency_ms_b1", "latency_threads", "epochs",
             "sha256")


def compress_plan(config: Config) -> list[tuple[float, str, int]]:
    """(budget, method, seed) in run order: every seed's full table before the next seed's, the
    scratch arm (the longest) last, over bench.scratch_seeds."""
    bc = config.bench
    plan = [(b, arm, seed) for seed in bc.seeds for b in bc.budgets for arm in bc.arms
            if ARMS[arm].recovery != "scratch"]
    return plan + [(b, arm, seed) for seed in bc.scratch_seeds for b in bc.budgets
                   for arm in bc.arms if ARMS[arm].recovery == "scratch"]


def _row_key(r: dict) -> tuple:
    return (r["budget"], list(ARMS).index(r["method"]) if r["method"] in ARMS else len(ARMS),
            r["method"], r["seed"])


def merge_published(old: dict, new: dict, source: str | os.PathLike) -> dict:
    """`new` (published form) with the rows of `old` that it has no (budget, method, seed) of: one
    benchmark grown over several runs, so `old` must come from the same experiment, baseline and
    sparse model (sha256) and recovery epochs, and each kept row must have been recovered as its
    method is now (`ours` follows pipeline.recovery), else an error naming the difference. The
    paired comparisons are the merged rows'; `commands` lists every command that made rows."""
    check_joinable(old, new, source)
    mine = {_row_key(r) for r in new["rows"]}
    rows = sorted([r for r in old.get("rows", []) if _row_key(r) not in mine] + new["rows"],
                  key=_row_key)
    commands = [c for c in old.get("commands", [old.get("command")]) if c]
    return {**new, "commands": list(dict.fromkeys([*commands, new["command"]])),
            "paired": paired_rows(rows), "rows": rows}


def check_joinable(old: dict, new: dict, source: str | os.PathLike) -> None:
    """Raise unless `old`'s rows come from `new`'s experiment, baseline and sparse model and
    recovery epochs, each recovered as its method is in `new` (merge_published; checked before any
    arm runs, too)."""
    for key in ("experiment", "recovery_epochs"):
        if old.get(key) != new[key]:
            raise YoloCompressError(f"{source}: its {key} is {old.get(key)!r}, this run's "
                                    f"{new[key]!r}: --merge joins the rows of one benchmark only")
    for key in ("baseline", "sparse"):
        theirs = (old.get(key) or {}).get("sha256")
        if theirs != new[key]["sha256"]:
            raise YoloCompressError(
                f"{source}: its {key} model is {str(theirs)[:12]}, this run's "
                f"{new[key]['sha256'][:12]}: --merge joins the rows of one benchmark only "
                f"(write another --json)")
    for r in old.get("rows", []):
        now = new["recoveries"].get(r["method"])
        if r.get("recovery") != now:
            raise YoloCompressError(
                f"{source}: its {r['method']} rows were recovered by "
                f"{r.get('recovery') or 'an unrecorded recovery'}, this run's {r['method']} by "
                f"{now} (pipeline.recovery): --merge joins the rows of one benchmark only")


def run_compress(config: Config, latency_iters: int = 30, md_path: Path | None = BENCHMARKS_MD,
                 plot_path: Path | None = None, json_path: Path | None = None,
                 merge: bool = False) -> dict:
    """Every arm at every budget and seed of `config.bench` (compress_plan); the result so far is
    saved after each row (runs/<name>/bench/compress.json), so a stopped run shows its progress
    and a re-run reuses every finished piece. Returns {"baseline", "sparse", "rows", "paired"};
    `json_path` gets the published form (PUBLISHED keys of each row); with `merge`, joined to the
    rows already there (merge_published), and the table and plot show the joined rows."""
    paths = run_to_sparse(config)
    root = run_dir(config) / "bench"
    reference = _reference(config, paths, latency_iters)
    n_train = len(load_data(config).train)
    result = {"experiment": config.name, "command": _command("compress", config),
              "recovery_epochs": recovery_epochs(config, n_train),
              "recoveries": {name: arm.recovery_of(config) for name, arm in ARMS.items()},
              "baseline": reference[0], "sparse": reference[1], "rows": [], "paired": []}
    published = _published_so_far(json_path, merge)
    if published is not None:
        check_joinable(published, _published(result), json_path)
    for b, arm, seed in compress_plan(config):
        result["rows"].append(run_arm(config, root / f"flops{round(b * 100)}", ARMS[arm],
                                      paths["sparse"], b, seed, latency_iters))
        result["paired"] = paired_rows(result["rows"])
        _save_json(root / "compress.json", result)
    out = _published(result)
    if published is not None:
        out = merge_published(published, out, json_path)
    if json_path is not None:
        _save_json(Path(json_path), out)
    rows = out["rows"]
    plot_path = plot_compress(rows, reference, plot_path or root / "compress_map_vs_flops.png")
    if md_path is not None:         # the markdown's plot lives beside it (runs/ is not shipped)
        beside = Path(md_path).parent / f"{config.name}-compress_map_vs_flops.png"
        with open(plot_path, "rb") as src, atomic_open(beside, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plot_path = beside
    table = compress_table(rows, reference) + "\n\n" + paired_table(out["paired"])
    print(table)
    if md_path is not None:
        notes = (f"`{config.name}` experiment; every arm prunes the same sparse model to the FLOPs "
                 f"budget, then recovers for {result['recovery_epochs']} epochs (scratch: the "
                 f"epochs column); mAP on the val split, mean ± sd over seeds; CPU latency median "
                 f"of batch-1 passes in torch, 1 thread")
        if published is not None:
            notes += f"; rows joined from {len(out['commands'])} runs of it ({json_path})"
        write_result(COMPRESS_HEADING, notes, machine("torch", "torch-pruning"),
                     f"{table}\n\n![mAP vs FLOPs]({_rel(plot_path, md_path)})", md_path,
                     command=result["command"])
    return result


def _published(result: dict) -> dict:
    """What `--json` gets of a run's result: PUBLISHED keys of each row, the reference models'
    scores and sha256s, the machine."""
    return {**{k: result[k] for k in ("experiment", "command", "recovery_epochs", "recoveries",
                                      "paired")},
            "machine": machine("torch", "torch-pruning"),
            **{k: {key: result[k][key] for key in ("map50_voc07", "map50_all", "flops", "params",
                                                   "latency_ms_b1", "sha256")}
               for k in ("baseline", "sparse")},
            "rows": [{k: r[k] for k in PUBLISHED} for r in result["rows"]]}


def _published_so_far(json_path: Path | None, merge: bool) -> dict | None:
    """With `merge`, the published rows at `json_path` (read before any run: a broken file stops
    the bench at once, not hours later); None without `merge` or where there is no file yet."""
    if not merge:
        return None
    if json_path is None:
        raise YoloCompressError("--merge needs the rows' file (--json), not --no-write")
    path = Path(json_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise YoloCompressError(f"{path}: unreadable as the benchmark's rows ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise YoloCompressError(f"{path}: not a `bench compress --json` file (no rows list)")
    return data


def _rel(path: Path, md_path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(md_path).resolve().parent))
    except ValueError:
        return str(path)


def _sparse_variant(config: Config, root: Path, schedule: str, seed: int, paths: dict,
                    budget: float, shared: Path) -> dict:
    """Sparse-train from the baseline with `schedule` and `seed`, prune to `budget` (ours):
    sparse mAP, share of |gamma| < 1e-2, mAP right after pruning. The experiment's own schedule
    and seed are its sparse stage, pruned as in the compress benchmark (`shared`)."""
    from ..compress.sparse_stage import run_sparse

    if schedule == config.sparse.schedule and seed == config.train.seed:
        sparse = paths["sparse"]
        pruned = prune_arm(config, shared, "ours", sparse, budget)
    else:
        folder = f"sparse-{schedule}-seed{seed}"
        cfg = arm_config(config, root, folder, seed)
        cfg = dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, schedule=schedule))
        sparse = run_sparse(cfg, from_artifact=paths["baseline"])
        pruned = prune_arm(cfg, root / folder, "ours", sparse, budget)
    art = load_artifact(sparse)
    return {"sparse_map50_voc07": art["metrics"].get("map50_voc07"),
            "frac_below_1e-2": art["sparsity"]["stats"]["frac_below_1e-2"],
            "map50_pruned": load_artifact(pruned)["metrics"]["map50_voc07"]}


def ablation_table(factors: Sequence[dict]) -> str:
    lines = ["| factor | variant | metric | mean ± sd | per seed |", "|---|---|---|---|---|"]
    for f in factors:
        for variant, runs in f["variants"].items():
            for metric in f["metrics"]:
                vals = [r[metric] for r in runs]
                lines.append(f"| {f['factor']} | {variant} | {metric} | {_pm(vals)} | "
                             + ", ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def run_ablation(config: Config, md_path: Path | None = BENCHMARKS_MD,
                 latency_iters: int = 0) -> dict:
    """Dynamic vs constant sparse rate, group vs global threshold, distillation vs plain
    fine-tuning; each over `bench.ablation_seeds` at `bench.ablation_budget`."""
    bc = config.bench
    paths = run_to_sparse(config)
    budget, seeds = bc.ablation_budget, bc.ablation_seeds
    root = run_dir(config) / "bench"
    shared = root / f"flops{round(budget * 100)}"     # the compress benchmark's runs are reused

    def arms(name: str) -> list[dict]:
        return [run_arm(config, shared, ARMS[name], paths["sparse"], budget, s, latency_iters)
                for s in seeds]

    def recovered(rows: list[dict]) -> list[dict]:
        return [{"map50_pruned": r["map50_pruned"], "map50_voc07": r["map50_voc07"]} for r in rows]

    factors = [
        {"factor": "sparse rate", "metrics": ["sparse_map50_voc07", "frac_below_1e-2",
                                               "map50_pruned"],
         "variants": {sched: [_sparse_variant(config, root / "ablation", sched, s, paths,
                                              budget, shared) for s in seeds]
                      for sched in ("local_decay", "constant")}},
        {"factor": "threshold", "metrics": ["map50_pruned", "map50_voc07"],
         "variants": {"per group (ours)": recovered(arms("ours_finetune")),
                      "one global": recovered(arms("global"))}},
        {"factor": "recovery", "metrics": ["map50_voc07"],
         "variants": {"attention distillation": recovered(arms("ours_distill")),
                      "plain fine-tune": recovered(arms("ours_finetune"))}},
    ]
    result = {"experiment": config.name, "budget": budget, "seeds": list(seeds),
              "factors": factors}
    _save_json(root / "ablation.json", result)
    table = ablation_table(factors)
    print(table)
    if md_path is not None:
        notes = (f"`{config.name}` experiment; FLOPs budget -{budget:.0%}; seeds "
                 f"{', '.join(map(str, seeds))} (sparse training seed for the sparse-rate factor, "
                 f"the recovery's seed otherwise); ± is the sd over seeds")
        write_result(ABLATION_HEADING, notes, machine("torch"), table, md_path,
                     command=_command("ablation", config))
    return result
