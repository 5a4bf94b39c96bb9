"""Stage 4 in the pipeline (`pipeline.quantize`): off, the pipeline and its report are as they
were; on, the recovered model's FP32 and INT8 ONNX are written, scored in ONNX Runtime as two
report rows, reused only with the same inputs, redone by --redo / --force, and bad input is one
line. On the miniature chain (one epoch per stage, 4 calibration images)."""
import json
import os
import shutil

import pytest

from yolocompress.artifacts import file_sha256
from yolocompress.cli import main
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError
from yolocompress.pipeline import PIPELINE, REPORT_KEYS, format_table, run_steps, score_artifact
from yolocompress.stages import pipeline_stages

from conftest import CHAIN_TRAIN, make_mini

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

FAST = ["sparse.epochs=1", "distill.epochs=1", "prune.percents=[0.5]"]
ON = ["pipeline.quantize=true", "quantize.calibration_images=4"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The mini chain run once with the stage off (runs/exp/): its folder."""
    base = make_mini(tmp_path_factory.mktemp("qpipe"), train=CHAIN_TRAIN)
    assert main(["pipeline", "--config", str(base / "exp.yaml"), "--latency-iters", "0",
                 *FAST]) == 0
    return base


def _experiment(chain, name):
    """A copy of the complete chain under another experiment name (the stages' inputs do not
    name the experiment, so all four are reused)."""
    shutil.copytree(chain / "runs" / "exp", chain / "runs" / name)
    return ["--config", str(chain / "exp.yaml"), *FAST, f"name={name}"]


def _pipeline(args, *extra, iters="0", redo=None):
    """`yolocompress pipeline` on the experiment `args` with more overrides `extra`."""
    flags = ["--latency-iters", iters, *(["--redo", redo] if redo else [])]
    return main(["pipeline", *flags, *args, *extra])


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_the_switch_orders_quantized_after_the_recovery_and_is_off_by_default(chain):
    off = load_config(chain / "exp.yaml")
    on = load_config(chain / "exp.yaml", ON)
    assert off.pipeline.quantize is False
    assert [s.name for s in pipeline_stages(off)] == [*PIPELINE, "finetuned"]
    assert [s.name for s in pipeline_stages(on)] == [*PIPELINE, "finetuned", "quantized"]
    distill = load_config(chain / "exp.yaml", [*ON, "pipeline.recovery=distill"])
    assert [s.name for s in pipeline_stages(distill)] == [*PIPELINE, "distilled", "quantized"]
    assert "quantized" not in PIPELINE


def test_off_writes_no_quantized_folder_and_the_report_has_the_torch_rows_only(chain):
    run = chain / "runs" / "exp"
    assert not (run / "quantized").exists()
    rows = json.loads((run / "report.json").read_text())["stages"]
    assert [r["stage"] for r in rows] == [*PIPELINE, "finetuned"]
    assert {(r["backend"], r["precision"]) for r in rows} == {("torch", "fp32")}
    assert all(r["latency_ms_b8"] is None for r in rows)
    md = (run / "report.md").read_text()
    assert "| stage | runtime |" in md and "CPU ms (b8)" not in md and "onnxruntime" not in md


def test_on_writes_the_onnx_pair_reports_two_onnx_rows_and_reuses_them(chain, capsys):
    args = _experiment(chain, "on")
    run = chain / "runs" / "on"
    before = json.loads((run / "report.json").read_text())["stages"]
    assert _pipeline(args, *ON, iters="2") == 0
    folder = run / "quantized"
    fp32, int8 = folder / "model-fp32.onnx", folder / "model-int8.onnx"
    metrics = json.loads((folder / "metrics.json").read_text())
    recovered = run / "finetuned" / "best.pt"
    assert metrics["inputs"]["parent"] == file_sha256(recovered)
    assert metrics["inputs"]["config"]["quantize"]["calibration_images"] == 4
    assert isinstance(metrics["inputs"]["config"]["quantize"]["reduce_range"], bool)
    assert metrics["files"] == {"model-fp32.onnx": file_sha256(fp32),
                                "model-int8.onnx": file_sha256(int8)}
    rows = json.loads((run / "report.json").read_text())["stages"]
    assert [r["stage"] for r in rows] == [*PIPELINE, "finetuned", "quantized", "quantized"]
    # the torch rows are those of the run without the stage
    keep = ("stage", "sha256", "map50_voc07", "map50_all", "params", "flops", "size_bytes")
    assert [{k: r[k] for k in keep} for r in rows[:4]] == [{k: r[k] for k in keep}
                                                           for r in before]
    dist, f32, i8 = rows[3], rows[4], rows[5]
    assert (f32["artifact"], i8["artifact"]) == (str(fp32), str(int8))
    for r, precision in ((f32, "fp32"), (i8, "int8")):
        assert set(REPORT_KEYS) <= set(r)
        assert (r["backend"], r["precision"]) == ("onnxruntime", precision)
        assert 0.0 <= r["map50_voc07"] <= 1.0 and 0.0 <= r["map50_all"] <= 1.0
        assert (r["params"], r["flops"]) == (dist["params"], dist["flops"])
        assert r["size_bytes"] == os.path.getsize(r["artifact"])
        assert r["sha256"] == file_sha256(r["artifact"]) and r["parent"] == dist["sha256"]
        assert r["latency_ms_b1"] > 0 and r["latency_ms_b8"] > 0 and r["latency_threads"] == 1
        assert [s["stage"] for s in r["lineage"]] == ["baseline", "sparse", "pruned", "finetuned"]
    assert i8["size_bytes"] < 0.5 * f32["size_bytes"]
    # the FP32 export scores as its artifact does (the same evaluator, another runtime)
    assert abs(f32["map50_voc07"] - dist["map50_voc07"]) < 0.02
    table = format_table(rows)
    assert "onnxruntime int8" in table and "torch fp32" in table and "CPU ms (b8)" in table
    md = (run / "report.md").read_text()
    assert "## quantized (onnxruntime int8)" in md and "never across runtimes" in md

    # a re-run reuses the complete stage: the same files, untouched
    stamps = [(file_sha256(p), p.stat().st_mtime_ns) for p in (fp32, int8)]
    capsys.readouterr()
    assert _pipeline(args, *ON) == 0
    assert f"quantized: {int8} is complete, skipping" in capsys.readouterr().out
    assert [(file_sha256(p), p.stat().st_mtime_ns) for p in (fp32, int8)] == stamps


def test_changed_inputs_are_refused_until_redo_or_force(chain, capsys):
    from yolocompress.compress.quantize_stage import pipeline_step

    args = _experiment(chain, "chg")
    config = load_config(chain / "exp.yaml", [*FAST, "name=chg", *ON])
    paths = run_steps(config)
    int8 = paths["quantized"]
    mtime = int8.stat().st_mtime_ns
    capsys.readouterr()
    code = _pipeline(args, *ON, "quantize.calibration_images=5")
    _one_line_error(capsys, code, f"{int8}: the complete quantized stage was made from other "
                    "inputs (quantize.calibration_images 4 -> 5)", "--force")
    # the CPU-dependent reduce_range is recorded as resolved: the other setting is a change too
    auto = json.loads((int8.parent / "metrics.json").read_text())["inputs"]["config"][
        "quantize"]["reduce_range"]
    code = _pipeline(args, *ON, f"quantize.reduce_range={str(not auto).lower()}")
    _one_line_error(capsys, code, f"quantize.reduce_range {auto} -> {not auto}")
    spelled = load_config(chain / "exp.yaml", [*FAST, "name=chg", *ON,
                                                f"quantize.reduce_range={str(auto).lower()}"])
    assert run_steps(spelled)["quantized"] == int8
    assert int8.stat().st_mtime_ns == mtime          # the same setting, spelled out: reused

    assert _pipeline(args, *ON, "quantize.calibration_images=5", redo="quantized") == 0
    metrics = json.loads((int8.parent / "metrics.json").read_text())
    assert metrics["inputs"]["config"]["quantize"]["calibration_images"] == 5
    assert int8.stat().st_mtime_ns != mtime
    out = capsys.readouterr().out
    assert "finetuned: " in out and "is complete, skipping" in out   # the stages before: reused

    # --force reaches the step as force=True (the pipeline's --force also redoes the others)
    mtime = int8.stat().st_mtime_ns
    six = load_config(chain / "exp.yaml", [*FAST, "name=chg", *ON, "quantize.calibration_images=6"])
    with pytest.raises(YoloCompressError, match="calibration_images 5 -> 6"):
        pipeline_step(six, paths, False, 0)
    assert pipeline_step(six, paths, True, 0) == int8 and int8.stat().st_mtime_ns != mtime
    assert json.loads((int8.parent / "metrics.json").read_text())["inputs"]["config"][
        "quantize"]["calibration_images"] == 6


def test_bad_input_is_one_line(chain, capsys, tmp_path):
    args = _experiment(chain, "bad")
    _one_line_error(capsys, _pipeline(args, "pipeline.quantize=maybe"), "pipeline.quantize",
                    "expected true or false")
    _one_line_error(capsys, _pipeline(args, redo="quantized"),
                    "--redo quantized: that stage is off in this experiment "
                    "(pipeline.quantize=true runs it)")
    assert _pipeline(args, *ON) == 0
    folder = chain / "runs" / "bad" / "quantized"
    # a complete stage whose file is not the one it wrote is never reused
    (folder / "model-fp32.onnx").write_bytes((folder / "model-int8.onnx").read_bytes())
    capsys.readouterr()
    _one_line_error(capsys, _pipeline(args, *ON), f"{folder / 'model-fp32.onnx'}: is not the "
                    "file the stage wrote", "--force redoes the quantized stage")
    (folder / "model-fp32.onnx").unlink()
    _one_line_error(capsys, _pipeline(args, *ON), "model-fp32.onnx: is missing")
    # an ONNX row needs the artifact it was exported from (its cfg: params and FLOPs)
    config = load_config(chain / "exp.yaml", ["name=bad"])
    with pytest.raises(YoloCompressError, match="needs the artifact it was exported from"):
        score_artifact(config, "quantized", folder / "model-int8.onnx", 0)
    # not an ONNX file where the step's result is: one line, nothing written over it
    (folder / "model-int8.onnx").write_text("not onnx")
    with pytest.raises(YoloCompressError, match="ONNX Runtime cannot load it"):
        score_artifact(config, "quantized", folder / "model-int8.onnx", 0,
                       source=chain / "runs" / "bad" / "finetuned" / "best.pt")
