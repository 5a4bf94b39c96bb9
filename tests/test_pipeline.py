"""`yolocompress pipeline` end to end on a miniature demo set: stages chained through artifacts,
the report, skipping complete stages, and a SIGKILL mid-stage followed by a clean resume."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from yolocompress.artifacts import file_sha256, load_artifact
from yolocompress.cli import main
from yolocompress.config import load_config
from yolocompress.pipeline import (PIPELINE, REPORT_KEYS, adopt_stage, format_table,
                                   run_pipeline, run_to_sparse, stage_complete)

from conftest import CHAIN_TRAIN, ROOT, make_mini

FAST = ["sparse.epochs=1", "distill.epochs=1", "prune.percents=[0.5]"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("mini"), train=CHAIN_TRAIN)


@pytest.fixture(scope="module")
def chained(mini):
    """`yolocompress pipeline` on the mini experiment: (its run folder, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["pipeline", "--config", str(mini / "exp.yaml"), "--latency-iters", "2",
                     *FAST]) == 0
    return mini / "runs" / "exp", printed.getvalue()


def test_pipeline_chains_stages_and_reports(mini, chained, capsys):
    run, out = chained
    report = json.loads((run / "report.json").read_text())
    rows = report["stages"]
    assert [r["stage"] for r in rows] == [*PIPELINE, "finetuned"]    # pipeline.recovery default
    for r in rows:
        assert set(REPORT_KEYS) <= set(r)
        assert 0.0 <= r["map50_voc07"] <= 1.0 and 0.0 <= r["map50_all"] <= 1.0
        assert r["size_bytes"] == os.path.getsize(r["artifact"]) and r["latency_ms_b1"] > 0
        assert r["sha256"] == file_sha256(r["artifact"])
        assert (run / r["stage"] / "pr_curves.png").is_file()
    base, sparse, pruned, finetuned = rows
    assert pruned["params"] < base["params"] and pruned["flops"] < base["flops"]
    assert finetuned["params"] == pruned["params"] and sparse["params"] == base["params"]
    # lineage: each artifact descends from the previous stage's file
    for prev, row in zip(rows, rows[1:]):
        assert row["parent"] == prev["sha256"]
        assert row["lineage"][-1]["stage"] == prev["stage"]
    assert [s["stage"] for s in finetuned["lineage"]] == ["baseline", "sparse", "pruned"]
    assert "distill" not in load_artifact(finetuned["artifact"])       # no teacher
    md = (run / "report.md").read_text()
    assert "| stage |" in md and "sparse/gamma_histograms.png" in md
    assert "pruned/channels_kept.png" in md
    assert format_table(rows).splitlines()[0].startswith("stage") and "finetuned" in out

    # everything complete: a second run skips every stage and leaves the artifacts alone
    shas = [r["sha256"] for r in rows]
    assert main(["pipeline", "--config", str(mini / "exp.yaml"), "--latency-iters", "0",
                 *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("is complete, skipping") == len(rows)
    again = json.loads((run / "report.json").read_text())["stages"]
    assert [r["sha256"] for r in again] == shas and again[0]["latency_ms_b1"] is None

    # the method's distillation instead: the stages before the recovery are reused, the
    # distilled stage is trained with the sparse model as its teacher and reported in its place
    assert main(["pipeline", "--config", str(mini / "exp.yaml"), "--latency-iters", "0",
                 *FAST, "pipeline.recovery=distill"]) == 0
    out = capsys.readouterr().out
    assert out.count("is complete, skipping") == len(PIPELINE)
    distilled = json.loads((run / "report.json").read_text())["stages"]
    assert [r["stage"] for r in distilled] == [*PIPELINE, "distilled"]
    assert [r["sha256"] for r in distilled[:3]] == shas[:3]
    assert distilled[3]["parent"] == pruned["sha256"]
    teacher = load_artifact(distilled[3]["artifact"])["distill"]["teacher"]
    assert teacher["sha256"] == sparse["sha256"]
    assert (run / "finetuned" / "best.pt").is_file()          # the other recovery is left alone


def test_stage_budget_overrides_train_epochs(mini, chained):
    best = load_artifact(chained[0] / "sparse" / "best.pt")
    assert best["config"]["train"]["epochs"] == 1 and best["config"]["sparse"]["epochs"] == 1
    cfg = load_config(mini / "exp.yaml", ["distill.epochs=3", "distill.lr=0.01",
                                          "distill.optimizer=sgd"])
    from yolocompress.train.run import with_stage_budget
    staged = with_stage_budget(cfg, cfg.distill)
    assert (staged.train.epochs, staged.train.lr, staged.train.optimizer) == (3, 0.01, "sgd")
    assert with_stage_budget(cfg, cfg.sparse) is cfg
    with pytest.raises(Exception, match="epochs: must be >= 1 or null"):
        load_config(mini / "exp.yaml", ["sparse.epochs=0"])


def test_finetune_command_is_the_plain_control(mini, chained):
    pruned = chained[0] / "pruned" / "best.pt"
    assert main(["finetune", "--config", str(mini / "exp.yaml"), "--student", str(pruned),
                 "distill.epochs=1", "name=ftcmd"]) == 0
    art = load_artifact(mini / "runs" / "ftcmd" / "finetuned" / "best.pt")
    assert art["stage"] == "finetuned" and art["parent"] == file_sha256(pruned)
    assert art["prune"] == load_artifact(pruned)["prune"] and "distill" not in art


def test_shipped_baseline_is_adopted_not_trained(mini, chained, capsys):
    shipped = chained[0] / "baseline" / "best.pt"
    config = load_config(mini / "exp.yaml", ["name=adopt", f"pipeline.baseline={shipped}", *FAST])
    assert adopt_stage(config, "baseline") is not None
    folder = mini / "runs" / "adopt" / "baseline"
    assert file_sha256(folder / "best.pt") == file_sha256(shipped)
    assert json.loads((folder / "metrics.json").read_text())["adopted_from"] == str(shipped)
    assert not (folder / "train_log.csv").exists() and "adopted" in capsys.readouterr().out
    assert adopt_stage(config, "baseline") is None                      # complete: kept
    # the sparse stage descends from the shipped file itself
    paths = run_to_sparse(config)
    assert load_artifact(paths["sparse"])["parent"] == file_sha256(shipped)
    bad = load_config(mini / "exp.yaml", ["name=adopt2", "pipeline.baseline="
                                          + str(chained[0] / "sparse" / "best.pt")])
    with pytest.raises(Exception, match="must be a baseline artifact, this one is 'sparse'"):
        adopt_stage(bad, "baseline")


def _wait_for(path, proc, timeout=240.0):
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"pipeline exited ({proc.returncode}) before {path} appeared:\n"
                        + proc.stdout.read())
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def test_killed_mid_stage_resumes_without_redoing_finished_stages(tmp_path, capsys):
    base = make_mini(tmp_path, train=CHAIN_TRAIN)
    args = ["--config", str(base / "exp.yaml"), "--latency-iters", "0", "sparse.epochs=3",
            "distill.epochs=1", "prune.percents=[0.5]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "yolocompress.cli", "pipeline", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sparse = base / "runs" / "exp" / "sparse"
    _wait_for(sparse / "last.pt", proc)     # sparse epoch 1 is saved: kill mid-stage
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    config = load_config(base / "exp.yaml", args[4:])
    assert stage_complete(config, "baseline") and not stage_complete(config, "sparse")
    baseline = base / "runs" / "exp" / "baseline" / "best.pt"
    sha, mtime = file_sha256(baseline), baseline.stat().st_mtime_ns
    capsys.readouterr()
    rows = run_pipeline(config, latency_iters=0)
    out = capsys.readouterr().out
    assert "baseline: " in out and "is complete, skipping" in out
    assert f"resuming from {sparse / 'last.pt'}" in out, out
    assert baseline.stat().st_mtime_ns == mtime and rows[0]["sha256"] == sha
    for stage in (*PIPELINE, "finetuned"):
        assert stage_complete(config, stage)
        load_artifact(base / "runs" / "exp" / stage / "best.pt")   # checks cfg/state_dict
    assert load_artifact(sparse / "last.pt", check=False)["train_state"]["epoch"] == 3
    assert not list((base / "runs").rglob("*.tmp*"))


def test_pipeline_stops_before_pruning_when_stage1_achieved_nothing(mini, capsys):
    # one epoch of stage 1 at lr 1e-3 leaves no gamma near 0, while pruning would cut half
    code = main(["pipeline", "--config", str(mini / "exp.yaml"), "--latency-iters", "0", *FAST,
                 "name=stop", "sparse.check=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.fullmatch(r"error: \S+/runs/stop/sparse/best\.pt: stage 1 left 0\.0% of the "
                        r"penalised BN gammas below 0\.01, but pruning removes \d+\.\d% of those "
                        r"channels \(needs >= \d+\.\d%, sparse\.check=0\.5\): train stage 1 longer "
                        r"\(sparse\.steps\), raise sparse\.s or use sparse\.schedule=target "
                        r"sparse\.target_fraction=0\.\d\d; sparse\.check=0 prunes anyway\n", err)
    assert stage_complete(load_config(mini / "exp.yaml", ["name=stop"]), "sparse")
    assert not (mini / "runs" / "stop" / "pruned").exists()
