"""What `pipeline.quantize: true` adds to a pipeline run, on one recovered artifact (default: the
demo's): the wall time of the pipeline's quantize step (export, calibration, INT8 model,
metrics.json) and of scoring its two report rows (mAP in ONNX Runtime on the val split, latency
at batch 1 and 8), with the rows themselves and the torch row of the artifact beside them.

It calls the pipeline's own functions (quantize_stage.pipeline_step, pipeline.score_artifact) in
a temp runs folder. `--write` saves docs/bench/quantize_step.json and the BENCHMARKS.md section.
Wall times include whatever else the machine runs: the load average and nice value are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from yolocompress.benchmarks import BENCHMARKS_MD, command_line, machine, run_script, write_result
from yolocompress.compress.quantize_stage import pipeline_step
from yolocompress.config import load_config
from yolocompress.fileio import atomic_open
from yolocompress.pipeline import format_table, score_artifact
from yolocompress.stages import get_stage, recovered_stage

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Stage 4 in the pipeline: what pipeline.quantize costs"
FINDINGS = """\
Reading it: the step is the `yolocompress quantize` work (export, 200 calibration images, INT8
model); scoring adds one val-split evaluation and the batch-1 and batch-8 timings per ONNX row.
One run, timed on the shared machine: the wall times and the INT8 / FP32 latency ratio move with
the load (the Stage 4 section's quiet 2-thread measurement gave 1.69x at batch 1). The FP32 ONNX
row scores exactly as the artifact in torch (the same evaluator, another runtime); the CPU ms of
the torch row and the ONNX rows are from different runtimes and are not compared."""
_KEEP = ("stage", "artifact", "backend", "precision", "map50_voc07", "map50_all", "params",
         "flops", "latency_ms_b1", "latency_ms_b8", "latency_threads", "size_bytes")


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path,
                    default=Path("/tmp/ci/main/runs/demo/finetuned/best.pt"))
    ap.add_argument("--config", type=Path, default=ROOT / "cfg" / "experiments" / "demo.yaml")
    ap.add_argument("--latency-iters", type=int, default=30, help="as the pipeline's default")
    ap.add_argument("--latency-threads", type=int, default=1, help="as the pipeline's default")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "quantize_step.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-step-") as tmp:
        config = load_config(args.config, [f"train.out_dir={tmp}", "pipeline.quantize=true"])
        stage = recovered_stage(config)           # the step quantizes the pipeline's recovery
        paths = {stage: args.artifact}
        int8, step_s = _timed(pipeline_step, config, paths, False, args.latency_iters)
        rows, score_s = [], []
        lat = (args.latency_iters, args.latency_threads)
        torch_row, _ = _timed(score_artifact, config, stage, args.artifact, *lat)
        for name in get_stage("quantized").report_files:
            row, s = _timed(score_artifact, config, "quantized", int8.parent / name, *lat,
                            source=args.artifact)
            rows.append(row)
            score_s.append(s)
    res = {"artifact": str(args.artifact), "machine": machine("onnxruntime", "torch"),
           "command": command_line(), "nice": os.nice(0),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "load_before": load_before, "load_after": os.getloadavg(),
           "step_s": step_s, "score_s": score_s, "stage_s": step_s + sum(score_s),
           "rows": [{k: r[k] for k in _KEEP} for r in (torch_row, *rows)]}
    text = markdown(res, [torch_row, *rows])
    print(text)
    if args.write:
        with atomic_open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        write_result(SECTION, f"{args.artifact}; rows in docs/bench/quantize_step.json",
                     res["machine"], text, BENCHMARKS_MD, command=res["command"])


def markdown(res: dict, rows: list[dict]) -> str:
    load = "/".join(f"{v:.1f}" for v in res["load_before"])
    return (f"The quantize step took {res['step_s']:.1f} s and scoring its two rows "
            f"{' + '.join(f'{s:.1f}' for s in res['score_s'])} s: {res['stage_s']:.0f} s in all "
            f"(nice {res['nice']}, OMP_NUM_THREADS {res['omp_num_threads']}, load average {load} "
            f"before). Latency is the median of "
            f"forward passes with {rows[0]['latency_threads']} thread(s) in the row's runtime; "
            "the torch row is the artifact's own, as the pipeline reports it.\n\n"
            + format_table(rows, markdown=True) + "\n\n" + FINDINGS)


if __name__ == "__main__":
    run_script(main)
