"""FBS dynamic channel gating against static pruning (the protocol's `ours`) at the same average MACs.

    python bench/bench_fbs.py --config cfg/experiments/bench-converged.yaml \
        --sparse runs/bench-converged/sparse/best.pt --densities 0.75 0.5 0.35 --seeds 0 1 \
        --root runs/bench-fbs --json docs/bench/fbs.json --write

Both arms start from the benchmark protocol's sparse model and train for its recovery budget
(distill.epochs / distill.steps, lr, optimizer), so they differ only in how the cost is cut. Per
seed and density d: `yolocompress gate` (gate.density=d) and its executed MACs per image averaged
over the val split (gate_stage.measure_artifact); then the static arm, the `ours` arm of `bench
compress` (the experiment's prune section to a FLOPs budget, then the pipeline's recovery,
`pipeline.recovery`: fine-tuning by default) at the FLOPs share the seed-0 FBS run saves. Runs
live in <root>/fbs-d<d>-seed<s>/ and <root>/flops<percent>/; a finished run with the same recorded inputs is reused. A budget the
prune limits refuse is recorded in the JSON's `refused` and the static row is left out.

Latency, once every run is trained (a quiet machine; `uptime` is recorded): torch, 1 thread,
batch 1, BN folded, for the sparse model, the static models and the FBS models twice -- with the
kept channels gathered per image (gating.gathered_model) and masking densely computed channels;
then ONNX Runtime (--threads, batch 1, --rounds interleaved rounds) for the sparse model and the
seed-0 models, FBS as exported (the masks applied to dense convs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from yolocompress.artifacts import build_model, file_sha256, load_artifact
from yolocompress.bench.arms import ARMS, arm_config, recovery_epochs, run_arm
from yolocompress.bench.suites import mean_sd
from yolocompress.benchmarks import (add_result_args, command_line, machine, run_script,
                                     time_side_by_side, uptime, write_result)
from yolocompress.compress.gate_stage import measure_artifact, run_gate, switching
from yolocompress.compress.gating import gathered_model
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError
from yolocompress.eval.speed import measure_latency
from yolocompress.fileio import atomic_open
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.profile import profile_summary
from yolocompress.train.run import config_evaluator, load_data, uses_letterbox

HEADING = "## Dynamic channel gating (FBS) vs static pruning at equal average MACs"


def _torch_ms(path: Path, size: int, iters: int, gather: bool = False) -> float:
    model = build_model(load_artifact(path), source=str(path))
    model = gathered_model(model) if gather else model
    return measure_latency(model, size, 1, warmup=max(1, iters // 5), iters=iters, threads=1,
                           fuse_bn=not gather)["ms_median"]


def _conv_macs(path: Path, size: int) -> int:
    return profile_summary(parse_cfg(load_artifact(path)["cfg"], source=f"{path}[cfg]"),
                           size, size)["flops_conv"] // 2


def _save(out: Path, doc: dict, row: dict | None = None) -> None:
    if row is not None:
        key = (row["method"], row["density"], row["seed"])
        doc["rows"] = [r for r in doc["rows"]
                       if (r["method"], r["density"], r["seed"]) != key] + [row]
        print(json.dumps(row), flush=True)
    with atomic_open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)


def _check(args) -> None:
    if not args.densities or not all(0 < d <= 1 for d in args.densities):
        raise YoloCompressError(f"--densities must be fractions in (0, 1], got {args.densities}")
    if len(set(args.densities)) != len(args.densities) or len(set(args.seeds)) != len(args.seeds):
        raise YoloCompressError("--densities and --seeds must not repeat a value")
    if args.latency_iters < 0 or args.rounds < 1 or args.threads < 1:
        raise YoloCompressError("--latency-iters must be >= 0, --rounds and --threads >= 1")


def _train(config, args, root: Path, sparse: Path, data, doc: dict) -> None:
    size = config.model.img_size
    epochs = recovery_epochs(config, len(data.train))
    # FBS trains exactly as long, and at the lr, as every arm's recovery
    gate = dataclasses.replace(config.gate, steps=None, epochs=epochs, lr=config.distill.lr,
                               optimizer=config.distill.optimizer)
    for seed in args.seeds:
        for d in args.densities:
            tag = f"d{d:g}"
            cfg = arm_config(dataclasses.replace(config, gate=dataclasses.replace(
                gate, density=d)), root, f"fbs-{tag}-seed{seed}", seed)
            best = run_gate(cfg, from_artifact=sparse)
            res = measure_artifact(cfg, best, data)
            _save(args.json, doc, {
                "method": "fbs", "density": d, "seed": seed, "macs": res["macs_mean"],
                "macs_sd": res["macs_sd"], "macs_dense": res["macs_dense"], "epochs": epochs,
                "map50_voc07": load_artifact(best)["metrics"]["map50_voc07"],
                **switching(res["usage"]), "artifact": str(best)})
            first = next((r for r in doc["rows"] if r["method"] == "fbs" and r["density"] == d
                          and r["seed"] == args.seeds[0]), doc["rows"][-1])
            budget = round(1 - first["macs"] / first["macs_dense"], 4)
            try:
                row = run_arm(config, root / f"flops{budget * 100:g}", ARMS["ours"], sparse,
                              budget, seed, latency_iters=0)
            except YoloCompressError as e:    # a budget the prune limits cannot reach
                doc.setdefault("refused", {})[tag] = f"FLOPs budget {budget}: {e}"
                _save(args.json, doc)
                print(f"static {tag}: not run: {e}", flush=True)
                continue
            _save(args.json, doc, {
                "method": "static", "density": d, "seed": seed,
                "macs": _conv_macs(Path(row["artifact"]), size),
                "macs_dense": first["macs_dense"], "flops_budget": budget,
                "flops": row["flops"], "params": row["params"], "epochs": row["epochs"],
                "map50_voc07": row["map50_voc07"], "map50_pruned": row["map50_pruned"],
                "artifact": row["artifact"]})


def _time(args, size: int, sparse: Path, doc: dict) -> None:
    it = args.latency_iters
    doc["latency"] = {"torch": {"threads": 1, "batch": 1, "iters": it, "statistic": "median",
                                "bn": "folded (not in the gathered FBS forward)"},
                      "onnxruntime": {"threads": args.threads, "batch": 1, "iters": it,
                                      "rounds": args.rounds, "statistic": "median of rounds"},
                      "img_size": size, "uptime_before": uptime()}
    doc["sparse"]["latency_ms_b1"] = _torch_ms(sparse, size, it)
    for row in doc["rows"]:
        path = Path(row["artifact"])
        row["latency_ms_b1"] = _torch_ms(path, size, it, gather=row["method"] == "fbs")
        if row["method"] == "fbs":
            row["latency_ms_b1_masked"] = _torch_ms(path, size, it)
    models = {"sparse": sparse, **{f"{r['method']} d{r['density']:g}": Path(r["artifact"])
                                   for r in doc["rows"] if r["seed"] == args.seeds[0]}}
    ms = time_side_by_side(models, size, args.threads, args.rounds, it, batch=1)
    doc["sparse"]["ort_ms_b1"] = statistics.median(ms["sparse"])
    for r in doc["rows"]:
        if r["seed"] == args.seeds[0]:
            r["ort_ms_b1"] = statistics.median(ms[f"{r['method']} d{r['density']:g}"])
    doc["latency"]["uptime_after"] = uptime()
    _save(args.json, doc)


def _mean_sd(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {sd:.4f}"


def table(doc: dict) -> str:
    """The markdown table of a finished doc: one line per arm and density, seeds pooled."""
    sp = doc["sparse"]
    ms = lambda v: "" if v is None else f"{v:.1f}"             # noqa: E731
    lines = ["| arm | density | seeds | MACs / image (M) | of dense | VOC07 mAP@0.5 (mean ± sd) "
             "| right after pruning | torch ms b1 | ORT ms b1 | notes |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---|",
             f"| sparse model (start of both) | 1 | — | {sp['macs'] / 1e6:.1f} | 100 % | "
             f"{sp['map50_voc07']:.4f} | | {ms(sp.get('latency_ms_b1'))} | "
             f"{ms(sp.get('ort_ms_b1'))} | |"]
    for d in sorted({r["density"] for r in doc["rows"]}, reverse=True):
        for method in ("fbs", "static"):
            rows = sorted((r for r in doc["rows"] if r["method"] == method and r["density"] == d),
                          key=lambda r: r["seed"])
            if not rows:
                continue
            macs = statistics.mean(r["macs"] for r in rows)
            lat = [r["latency_ms_b1"] for r in rows if "latency_ms_b1" in r]
            ort = next((r["ort_ms_b1"] for r in rows if "ort_ms_b1" in r), None)
            if method == "fbs":
                name, after = "FBS", ""
                masked = [r["latency_ms_b1_masked"] for r in rows if "latency_ms_b1_masked" in r]
                notes = (f"torch gathered; masked {statistics.mean(masked):.1f} ms; " if masked
                         else "") + f"MACs sd {statistics.mean(r['macs_sd'] for r in rows) / 1e6:.1f} M"
                if all("switching_share" in r for r in rows):
                    notes += (f"; {statistics.mean(r['switching_share'] for r in rows):.1%} of "
                              f"channels switch, in <= {max(r['gates_switching'] for r in rows)} "
                              f"of {rows[0]['gates']} gates")
            else:
                name = "static (ours), same MACs"
                after = f"{statistics.mean(r['map50_pruned'] for r in rows):.4f}"
                notes = f"FLOPs budget {rows[0]['flops_budget']:.1%}"
            lines.append(
                f"| {name} | {d:g} | {','.join(str(r['seed']) for r in rows)} | {macs / 1e6:.1f} | "
                f"{macs / sp['macs']:.1%} | {_mean_sd([r['map50_voc07'] for r in rows])} | "
                f"{after} | {ms(statistics.mean(lat) if lat else None)} | {ms(ort)} | {notes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sparse", type=Path, required=True,
                    help="the protocol's sparse model: where both arms start")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.75, 0.5, 0.35])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--root", type=Path, default=Path("runs/bench-fbs"))
    ap.add_argument("--latency-iters", type=int, default=30, help="0: no latency")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime's intra-op threads")
    ap.add_argument("--rounds", type=int, default=3)
    add_result_args(ap)
    args = ap.parse_args(argv)
    _check(args)
    config = load_config(args.config, args.overrides)
    art = load_artifact(args.sparse)
    sparse, root, size = args.sparse.resolve(), args.root.resolve(), config.model.img_size
    model = build_model(art, source=str(sparse))
    sha = file_sha256(sparse)
    doc = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if doc.get("sparse", {}).get("sha256") != sha:
        doc = {"rows": []}                 # rows of another start are not this benchmark's
    data = load_data(config)
    doc.update(command=command_line(), training={
        "epochs": recovery_epochs(config, len(data.train)), "lr": config.distill.lr,
        "optimizer": config.distill.optimizer, "batch_size": config.train.batch_size,
        "img_size": size})
    doc["sparse"] = {
        "artifact": str(args.sparse), "sha256": sha,
        "map50_voc07": config_evaluator(config, data.val, data.names, uses_letterbox(
            config, model))(model)["map50_voc07"],
        "macs": profile_summary(model.blocks, size, size)["flops_conv"] // 2}
    _train(config, args, root, sparse, data, doc)
    if args.latency_iters:
        _time(args, size, sparse, doc)
    text = table(doc)
    print(text)
    if args.write:
        write_result(HEADING, f"sparse model {args.sparse}, {size} px, rows in {args.json}",
                     machine("torch", "onnxruntime"), text, args.markdown)
    return 0


if __name__ == "__main__":
    run_script(main)
