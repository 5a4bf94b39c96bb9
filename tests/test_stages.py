"""The stage registry, load_parent, the one skip rule (inputs.py) and stale temp files, on the
miniature demo set: each defect of issue 13 has a regression test here."""
import json
import os
import subprocess
import sys

import pytest
import torch

from yolocompress.artifacts import (artifact_from_model, file_sha256, load_artifact, load_parent,
                                    make_artifact, save_artifact)
from yolocompress.cli import build_parser, main
from yolocompress.compress.distill_stage import run_distill
from yolocompress.compress.prune_stage import run_prune
from yolocompress.config import load_config
from yolocompress.data.synthetic import DEMO_CLASSES
from yolocompress.errors import YoloCompressError
from yolocompress.eval.evaluate import ModelEvaluator
from yolocompress.fileio import atomic_open, remove_stale_temps
from yolocompress.inputs import describe_changes, stage_inputs
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.pipeline import PIPELINE, adopt_stage, run_steps
from yolocompress.stages import (STAGES, Stage, pipeline_stages, recovered_stage, recovery_stages,
                                 switch_hint)
from yolocompress.train.run import run_stage

from conftest import CHAIN_TRAIN, ROOT, make_mini

NAMES = list(DEMO_CLASSES)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The mini demo set + artifacts of two differently seeded nanos: `t.pt` (stage sparse, the
    teacher), `a.pt` / `b.pt` (stage pruned, children of t.pt), `base1.pt` / `base2.pt`
    (stage baseline)."""
    base = make_mini(tmp_path_factory.mktemp("stages"), train=CHAIN_TRAIN)
    cfg = read_cfg(ROOT / "cfg/models/yolov4-nano.cfg")

    def nano(seed):
        torch.manual_seed(seed)
        m = Darknet(cfg, classes=len(NAMES))
        m.initialize()
        return m

    sha = save_artifact(artifact_from_model(nano(0), "sparse", NAMES, input_size=[64, 64]),
                        base / "t.pt")
    lineage = [{"stage": "sparse", "sha256": sha, "path": str(base / "t.pt")}]
    for name, seed in (("a", 1), ("b", 2)):
        save_artifact(artifact_from_model(nano(seed), "pruned", NAMES, input_size=[64, 64],
                                          parent=sha, lineage=lineage), base / f"{name}.pt")
    for name, seed in (("base1", 3), ("base2", 4)):
        save_artifact(artifact_from_model(nano(seed), "baseline", NAMES, input_size=[64, 64]),
                      base / f"{name}.pt")
    return base


def _one_line_error(capsys, argv, msg):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    return err


# ---- the registry ------------------------------------------------------------------------------

def _toy_entry(config, args):
    print(f"toy ran for {config.name} with --knob {args.knob}")


def test_a_registered_toy_stage_is_a_valid_artifact_stage_and_a_command(mini, monkeypatch, capsys):
    with pytest.raises(YoloCompressError, match="unknown artifact stage 'toy'"):
        make_artifact("toy", "", {}, NAMES, [64, 64])
    assert "toy" not in build_parser().format_help()
    from yolocompress.stages import Option
    monkeypatch.setitem(STAGES, "toy", Stage(
        "toy", parents=("pruned",), command="toy", help="a toy stage",
        options=(Option(("--knob",), {"type": int, "default": 3}),),
        entry="test_stages:_toy_entry"))
    assert make_artifact("toy", "", {}, NAMES, [64, 64])["stage"] == "toy"
    assert "toy" in build_parser().format_help()
    assert main(["toy", "--config", str(mini / "exp.yaml"), "--knob", "7"]) == 0
    assert "toy ran for exp with --knob 7" in capsys.readouterr().out
    # its accepted parents are checked by load_parent
    assert load_parent(mini / "a.pt", NAMES, "toy")["stage"] == "pruned"
    with pytest.raises(YoloCompressError, match="the parent of toy must be one of: pruned"):
        load_parent(mini / "t.pt", NAMES, "toy")
    assert "toy" not in [s.name for s in pipeline_stages()]     # no pipeline step


def test_pipeline_order_plots_and_recoveries_come_from_the_registry():
    assert PIPELINE == ("baseline", "sparse", "pruned")
    assert {k: s.name for k, s in recovery_stages().items()} == {
        "distill": "distilled", "finetune": "finetuned", "scratch": "scratch"}
    assert "gamma_histograms.png" in STAGES["sparse"].plots
    cfg = load_config(ROOT / "cfg/experiments/demo.yaml")
    assert set(cfg.bench.arms) == {"ours", "ours_finetune", "ours_distill", "ours_iterative",
                                   "torch_pruning", "global", "scratch"}
    # the recovery after pruning is one step, chosen by pipeline.recovery (fine-tuning by default)
    distill = load_config(ROOT / "cfg/experiments/demo.yaml", ["pipeline.recovery=distill",
                                                               "pipeline.quantize=false"])
    assert [s.name for s in pipeline_stages(cfg)] == [*PIPELINE, "finetuned", "quantized"]
    assert [s.name for s in pipeline_stages(distill)] == [*PIPELINE, "distilled"]
    assert (recovered_stage(cfg), recovered_stage(distill)) == ("finetuned", "distilled")
    assert switch_hint(STAGES["distilled"]) == "pipeline.recovery=distill"
    assert switch_hint(STAGES["quantized"]) == "pipeline.quantize=true"
    with pytest.raises(YoloCompressError, match="pipeline.recovery=prune: expected one of"):
        load_config(ROOT / "cfg/experiments/demo.yaml", ["pipeline.recovery=prune"])
    with pytest.raises(YoloCompressError, match="bench.arms"):
        load_config(ROOT / "cfg/experiments/demo.yaml", ["bench.arms=[nope]"])


# ---- load_parent -------------------------------------------------------------------------------

def test_load_parent_checks_stage_classes_and_adds_sha(mini, tmp_path):
    art = load_parent(mini / "a.pt", NAMES, "distilled", role="student")
    assert art["sha256"] == file_sha256(mini / "a.pt") and art["path"] == str(mini / "a.pt")
    with pytest.raises(YoloCompressError, match="student classes .* differ from the data set's"):
        load_parent(mini / "a.pt", NAMES[::-1], "distilled", role="student")
    with pytest.raises(YoloCompressError, match="must be an artifact"):
        load_parent(tmp_path / "x.weights", NAMES)


def test_distill_student_must_be_a_pruned_artifact(mini, capsys):
    _one_line_error(capsys, ["distill", "--config", str(mini / "exp.yaml"), "--student",
                             str(mini / "base1.pt"), "--teacher", str(mini / "t.pt")],
                    "a 'baseline' artifact; the student of distilled must be one of: pruned")
    _one_line_error(capsys, ["finetune", "--config", str(mini / "exp.yaml"), "--student",
                             str(mini / "t.pt")], "a 'sparse' artifact; the student of finetuned")


# ---- the skip rule -----------------------------------------------------------------------------

def test_describe_changes_by_hand():
    old = {"parent": "a" * 64, "config": {"train": {"lr": 0.001, "epochs": 1}}}
    new = {"parent": "b" * 64, "config": {"train": {"lr": 0.002, "epochs": 1, "x": 1}}}
    assert describe_changes(old, old) == []
    assert describe_changes(old, new) == [f"parent sha256 {'a' * 12} -> {'b' * 12}",
                                          "train.lr 0.001 -> 0.002", "train.x '<unset>' -> 1"]
    # inputs not recorded (an older artifact): only what it records is compared
    assert describe_changes(old, new, known=False) == describe_changes(old, new)[:2]
    assert describe_changes({"source": "s"}, old) == [
        "it was adopted from a file, now it would be trained"]
    # a setting added after the stage ran is unchanged at its default, a change off it
    later = {"parent": "a" * 64, "config": {"train": {"lr": 0.001, "epochs": 1},
                                            "distill": {"decay": "none"}}}
    assert describe_changes(old, later) == []
    later["config"]["distill"]["decay"] = "linear"
    assert describe_changes(old, later) == ["distill.decay '<unset>' -> 'linear'"]
    # ... unless its default changed what the stage does: prune.reconstruct came with 128, and
    # a record without it was made with no reconstruction
    pruned = {"parent": "a" * 64, "config": {"prune": {"recalibrate": 400}}}
    now = {"parent": "a" * 64, "config": {"prune": {"recalibrate": 400, "reconstruct": 128}}}
    assert describe_changes(pruned, now) == ["prune.reconstruct '<unset>' -> 128"]
    now["config"]["prune"]["reconstruct"] = 0
    assert describe_changes(pruned, now) == []


def test_stage_inputs_ignore_where_not_what(mini):
    a = stage_inputs(load_config(mini / "exp.yaml"), "pruned", parent="p")
    b = stage_inputs(load_config(mini / "exp.yaml", ["train.out_dir=/elsewhere",
                                                     "data.workers=3", "distill.epochs=9", "train.device=cpu",
                                                     "train.log_interval=7"]),
                     "pruned", parent="p")
    assert a == b and set(a["config"]) == {"model", "data", "train", "eval", "prune"}
    c = stage_inputs(load_config(mini / "exp.yaml", ["prune.min_keep=0.2"]), "pruned", parent="p")
    assert describe_changes(a, c) == ["prune.min_keep 0.1 -> 0.2"]


def test_distill_with_another_student_refuses_then_force_redoes_it(mini, capsys):
    cfg = load_config(mini / "exp.yaml", ["name=kd", "distill.epochs=1"])
    best = run_distill(cfg, mini / "a.pt", mini / "t.pt")
    art = load_artifact(best)
    assert art["inputs"]["parent"] == file_sha256(mini / "a.pt")
    assert art["inputs"]["teacher"] == file_sha256(mini / "t.pt")
    sha = file_sha256(best)
    capsys.readouterr()
    run_distill(cfg, mini / "a.pt", mini / "t.pt")                      # same inputs: reused
    assert "is complete, skipping" in capsys.readouterr().out and file_sha256(best) == sha
    err = _one_line_error(capsys, ["distill", "--config", str(mini / "exp.yaml"), "name=kd",
                                   "distill.epochs=1", "--student", str(mini / "b.pt"),
                                   "--teacher", str(mini / "t.pt")], "made from other inputs")
    assert f"parent sha256 {file_sha256(mini / 'a.pt')[:12]}" in err and "--force" in err
    assert file_sha256(best) == sha                                     # nothing discarded
    # another teacher is another input too
    with pytest.raises(YoloCompressError, match="teacher sha256"):
        run_distill(cfg, mini / "a.pt", mini / "base1.pt")
    run_distill(cfg, mini / "b.pt", mini / "t.pt", force=True)
    assert load_artifact(best)["parent"] == file_sha256(mini / "b.pt")


def _plant_temps(folder):
    """A dead writer's temp, a live writer's temp, and an unrelated file; (dead, live, proc)."""
    folder.mkdir(parents=True, exist_ok=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead_tmp = folder / f".best.pt.{gone.pid}.k3j_x9.tmp"
    live_tmp = folder / f".last.pt.{live.pid}.a8b2cd.tmp"
    for p in (dead_tmp, live_tmp, folder / "notes.txt"):
        p.write_bytes(b"x")
    return dead_tmp, live_tmp, live


def test_train_with_another_lr_refuses_and_resume_removes_stale_temps(mini, capsys):
    exp = str(mini / "exp.yaml")
    assert main(["train", "--config", exp, "name=lr"]) == 0
    run = mini / "runs" / "lr" / "baseline"
    sha = file_sha256(run / "best.pt")
    assert json.loads((run / "metrics.json").read_text())["inputs"]["config"]["train"]["lr"] \
        == 0.001
    capsys.readouterr()
    err = _one_line_error(capsys, ["train", "--config", exp, "name=lr", "train.lr=0.002"],
                          "train.lr 0.001 -> 0.002")
    assert "baseline stage was made from other inputs" in err
    assert file_sha256(run / "best.pt") == sha
    # interrupted (metrics.json gone) with orphans of a killed writer: the resume removes them,
    # but not a live writer's temp file
    (run / "metrics.json").unlink()
    dead_tmp, live_tmp, live = _plant_temps(run)
    try:
        assert main(["train", "--config", exp, "name=lr"]) == 0
        assert "resuming from" in capsys.readouterr().out
        assert not dead_tmp.exists() and live_tmp.exists() and (run / "notes.txt").exists()
    finally:
        live.kill()
        live.wait()
    # the resume of another config is refused with what differs
    (run / "metrics.json").unlink()
    with pytest.raises(YoloCompressError,
                       match=r"an interrupted run from other inputs \(train.lr"):
        run_stage(load_config(exp, ["name=lr", "train.lr=0.002"]), "baseline")
    assert main(["train", "--config", exp, "name=lr", "train.lr=0.002", "--force"]) == 0
    assert load_artifact(run / "best.pt")["config"]["train"]["lr"] == 0.002


def test_pipeline_baseline_pointing_at_another_file_refuses(mini, capsys):
    cfg = load_config(mini / "exp.yaml", ["name=adopt", f"pipeline.baseline={mini / 'base1.pt'}"])
    best = adopt_stage(cfg, "baseline")
    assert file_sha256(best) == file_sha256(mini / "base1.pt")
    assert adopt_stage(cfg, "baseline") is None                                  # same file: kept
    other = load_config(mini / "exp.yaml", ["name=adopt",
                                            f"pipeline.baseline={mini / 'base2.pt'}"])
    with pytest.raises(YoloCompressError, match="made from other inputs \\(source sha256 "
                       + file_sha256(mini / "base1.pt")[:12]):
        adopt_stage(other, "baseline")
    assert file_sha256(best) == file_sha256(mini / "base1.pt")
    assert adopt_stage(other, "baseline", force=True) == best
    assert file_sha256(best) == file_sha256(mini / "base2.pt")
    # the adopted stage is not silently taken for a trained one either
    with pytest.raises(YoloCompressError, match="it was adopted from a file, now it would be"):
        run_stage(load_config(mini / "exp.yaml", ["name=adopt"]), "baseline")


def test_pipeline_sparse_adopts_a_sparse_model_of_this_baseline_only(mini, capsys):
    base1 = file_sha256(mini / "base1.pt")
    art = load_artifact(mini / "t.pt")
    art.update(parent=base1, lineage=[{"stage": "baseline", "sha256": base1,
                                       "path": str(mini / "base1.pt")}])
    shipped = mini / "sparse1.pt"
    save_artifact(art, shipped)
    over = ["name=adopt_sparse", f"pipeline.baseline={mini / 'base1.pt'}",
            f"pipeline.sparse={shipped}", "sparse.check=0"]
    cfg = load_config(mini / "exp.yaml", over)
    paths = run_steps(cfg, until="sparse")             # the pipeline's steps: adopted, not trained
    folder = mini / "runs" / "adopt_sparse" / "sparse"
    assert paths["sparse"] == folder / "best.pt" and file_sha256(paths["sparse"]) == \
        file_sha256(shipped)
    assert not (folder / "train_log.csv").exists() and "sparse: adopted" in capsys.readouterr().out
    assert json.loads((folder / "metrics.json").read_text())["inputs"] == {
        "source": file_sha256(shipped)}
    assert adopt_stage(cfg, "sparse", parent=base1) is None             # complete: kept
    # a sparse model of another baseline is refused, the adopted stage untouched
    with pytest.raises(YoloCompressError, match="was trained from " + base1[:12]
                       + ", not from this experiment's baseline"):
        adopt_stage(cfg, "sparse", parent=file_sha256(mini / "base2.pt"))
    other = load_config(mini / "exp.yaml", [*over[:1], f"pipeline.baseline={mini / 'base2.pt'}",
                                            *over[2:]])
    with pytest.raises(YoloCompressError, match="not from this experiment's baseline"):
        run_steps(other, until="sparse", force=True)
    assert file_sha256(folder / "best.pt") == file_sha256(shipped)
    # only a sparse artifact is adopted as one
    bad = load_config(mini / "exp.yaml", ["name=adopt_sparse2",
                                          f"pipeline.sparse={mini / 'base2.pt'}"])
    with pytest.raises(YoloCompressError, match="must be a sparse artifact, this one is 'baseline'"):
        adopt_stage(bad, "sparse")
    # `yolocompress sparse` does not take the adopted stage for a trained one
    with pytest.raises(YoloCompressError, match="it was adopted from a file, now it would be"):
        run_stage(cfg, "sparse")
    # nor the pipeline a trained stage for an adopted one
    trained = stage_inputs(cfg, "sparse", parent=base1)
    assert describe_changes(trained, {"source": file_sha256(shipped)}) == [
        "it was trained, now it would be adopted from a file"]


def test_prune_with_a_changed_prune_section_refuses(mini, capsys):
    out = mini / "runs" / "p" / "pruned" / "best.pt"
    cfg = load_config(mini / "exp.yaml", ["prune.percents=[0.3]"])
    dead_tmp, live_tmp, live = _plant_temps(out.parent)
    try:
        run_prune(cfg, mini / "t.pt", out, latency_iters=0)
        assert not dead_tmp.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()
    sha = file_sha256(out)
    assert json.loads((out.parent / "metrics.json").read_text())["inputs"]["parent"] \
        == file_sha256(mini / "t.pt")
    capsys.readouterr()
    run_prune(cfg, mini / "t.pt", out, latency_iters=0)
    assert "pruned: " in capsys.readouterr().out and file_sha256(out) == sha
    _one_line_error(capsys, ["prune", "--config", str(mini / "exp.yaml"), "--from",
                             str(mini / "t.pt"), "--out", str(out), "--latency-iters", "0",
                             "prune.percents=[0.5]"], "prune.percents [0.3] -> [0.5]")
    assert file_sha256(out) == sha
    # an artifact of an older version (no inputs recorded): its parent and config are compared
    art = load_artifact(out)
    del art["inputs"]
    save_artifact(art, out)
    metrics = json.loads((out.parent / "metrics.json").read_text())
    del metrics["inputs"]
    (out.parent / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    run_prune(cfg, mini / "t.pt", out, latency_iters=0)
    text = capsys.readouterr().out
    assert "records no inputs" in text and "is complete, skipping" in text
    with pytest.raises(YoloCompressError, match="prune.percents"):
        run_prune(load_config(mini / "exp.yaml", ["prune.percents=[0.5]"]), mini / "t.pt", out,
                  latency_iters=0)
    run_prune(load_config(mini / "exp.yaml", ["prune.percents=[0.5]"]), mini / "t.pt", out,
              latency_iters=0, force=True)
    assert load_artifact(out)["config"]["prune"]["percents"] == [0.5]


# ---- temp files and the evaluator --------------------------------------------------------------

def test_temp_names_carry_the_writer_pid(tmp_path):
    seen = []
    with atomic_open(tmp_path / "x.json", "w") as f:
        seen += [p.name for p in tmp_path.iterdir()]
        f.write("{}")
    assert len(seen) == 1 and seen[0].startswith(f".x.json.{os.getpid()}.")
    assert remove_stale_temps(tmp_path) == [] and remove_stale_temps(tmp_path / "none") == []
    legacy = tmp_path / ".best.pt.abc123.tmp"          # an older version's: stale once old
    legacy.write_bytes(b"")
    assert remove_stale_temps(tmp_path) == [] and legacy.exists()
    os.utime(legacy, (1, 1))
    assert remove_stale_temps(tmp_path) == [legacy] and not legacy.exists()


def test_model_evaluator_from_config(mini):
    cfg = load_config(mini / "exp.yaml", ["eval.metric=voc12", "eval.conf_thresh=0.01"])
    ev = ModelEvaluator.from_config(cfg, NAMES, True)
    assert ev == ModelEvaluator(tuple(NAMES), 64, True, "voc12", 6, 0, 0.01, cfg.eval.nms_iou,
                                cfg.eval.max_det)
    with pytest.raises(YoloCompressError, match="unknown metric 'map'"):
        ModelEvaluator(NAMES, 64, metric="map")


def test_pipeline_redo_forces_the_named_stage_and_those_after_it(monkeypatch):
    import yolocompress.pipeline as pipeline
    calls = []

    def step_for(ref):
        def step(config, paths, force, latency_iters):
            calls.append((ref, force))
            return ref
        return step

    monkeypatch.setattr(pipeline, "resolve", step_for)
    steps = [s.pipeline_step for s in pipeline_stages()]
    pipeline.run_steps(None, redo=PIPELINE[1])
    assert calls == [(steps[0], False)] + [(s, True) for s in steps[1:]]
    calls.clear()
    pipeline.run_steps(None)
    assert calls == [(s, False) for s in steps]
    with pytest.raises(YoloCompressError, match="--redo distill: not a pipeline stage"):
        pipeline.run_steps(None, redo="distill")


# ---- the scratch control -----------------------------------------------------------------------

def test_scratch_reinitialises_the_pruned_architecture_with_the_train_seed(mini):
    from yolocompress.compress.scratch_stage import build_scratch
    from yolocompress.train.run import load_data

    config = load_config(mini / "exp.yaml", ["train.seed=7", "train.epochs=3"])
    cfg_out, parts = build_scratch(config, load_data(config), mini / "a.pt")
    pruned = load_artifact(mini / "a.pt")
    assert parts.parent["sha256"] == file_sha256(mini / "a.pt")
    assert parts.extra == {"scratch": {"epochs": 3}}    # a.pt carries no prune record
    torch.manual_seed(7)
    fresh = Darknet(read_cfg(ROOT / "cfg/models/yolov4-nano.cfg"), classes=len(NAMES))
    fresh.initialize()
    mine = parts.model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in fresh.state_dict().items())
    assert not torch.equal(mine["layers.0.conv.weight"],
                           pruned["state_dict"]["layers.0.conv.weight"])
    with pytest.raises(YoloCompressError, match="the architecture of scratch must be one of: pruned"):
        build_scratch(config, load_data(config), mini / "t.pt")
