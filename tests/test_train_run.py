"""`yolocompress train` end to end on a miniature demo set: artifacts, logs, skip/resume, eval, lineage."""
import json

import pytest
import torch

from yolocompress.artifacts import load_artifact
from yolocompress.cli import main
from yolocompress.config import load_config
from yolocompress.data.synthetic import DEMO_CLASSES
from yolocompress.train.run import MultiScaleHook, run_stage

from conftest import make_mini


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A 12/6-image demo set at 64 px, its descriptor, and an experiment on yolov4-nano."""
    return make_mini(tmp_path_factory.mktemp("mini"))


@pytest.fixture(scope="module")
def trained(mini):
    """`yolocompress train` on the mini experiment: its run folder (runs/exp/baseline)."""
    assert main(["train", "--config", str(mini / "exp.yaml")]) == 0
    return mini / "runs" / "exp" / "baseline"


def test_train_writes_artifacts_logs_and_skips_when_complete(mini, trained, capsys):
    run = trained
    for name in ("best.pt", "last.pt", "metrics.json", "train_log.csv", "training_curves.png"):
        assert (run / name).is_file(), name
    best = load_artifact(run / "best.pt")
    assert best["stage"] == "baseline" and best["classes"] == list(DEMO_CLASSES)
    assert best["input_size"] == [64, 64] and "map50_voc07" in best["metrics"]
    assert best["config"]["train"]["epochs"] == 2
    last = load_artifact(run / "last.pt")
    assert "train_state" in last
    rows = (run / "train_log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "map50_voc07" in rows[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stage"] == "baseline"
    capsys.readouterr()
    assert main(["train", "--config", str(mini / "exp.yaml")]) == 0
    assert "is complete, skipping" in capsys.readouterr().out


def test_resume_continues_from_last(mini, capsys):
    cfg = load_config(mini / "exp.yaml", ["name=resume", "train.epochs=1"])
    run_stage(cfg, "baseline")
    run = mini / "runs" / "resume" / "baseline"
    one = load_artifact(run / "last.pt")
    (run / "metrics.json").unlink()                     # as if killed before the stage finished
    cfg2 = load_config(mini / "exp.yaml", ["name=resume", "train.epochs=1"])
    capsys.readouterr()
    run_stage(cfg2, "baseline")
    assert "resuming from" in capsys.readouterr().out
    # nothing left to train: the resumed run ends with the same weights
    two = load_artifact(run / "last.pt")
    assert all(torch.equal(one["state_dict"][k], two["state_dict"][k]) for k in one["state_dict"])
    other = load_config(mini / "exp.yaml", ["name=resume", "train.epochs=1", "train.lr=0.002"])
    (run / "metrics.json").unlink()
    with pytest.raises(Exception, match="an interrupted run from other inputs"):
        run_stage(other, "baseline")


def test_fine_tune_from_artifact_records_lineage(mini, trained):
    parent = trained / "best.pt"
    cfg = load_config(mini / "exp.yaml", ["name=child", "train.epochs=1",
                                          f"model.weights={parent}"])
    best = load_artifact(run_stage(cfg, "baseline"))
    from yolocompress.artifacts import file_sha256
    assert best["parent"] == file_sha256(parent)
    assert best["lineage"][-1]["stage"] == "baseline"


def test_eval_command_json(mini, trained, tmp_path, capsys):
    art = trained / "best.pt"
    out = tmp_path / "eval.json"
    assert main(["eval", str(art), "--data", str(mini / "demo.yaml"), "--json", str(out),
                 "--workers", "0", "--plots", str(tmp_path)]) == 0
    res = json.loads(out.read_text())
    assert res["metric"] == "voc07" and set(res["per_class"]) == set(DEMO_CLASSES)
    assert 0.0 <= res["map"] <= 1.0 and res["map"] == res["map50_voc07"]
    assert (tmp_path / "pr_curves.png").is_file()
    assert "mAP (voc07)" in capsys.readouterr().out


def test_multi_scale_hook_resizes_batch_and_boxes():
    hook = MultiScaleHook(256, 0.4, interval=1, seed=0)
    assert hook.sizes == list(range(128, 352 + 1, 32))

    class T:
        batch_idx, accumulate, iter = 0, 1, 0
        batch = (torch.rand(2, 3, 256, 256), torch.tensor([[0, 1, 10.0, 20.0, 100.0, 120.0]]), [])
    hook.trainer = T()
    hook.before_step()
    images, targets, _ = hook.trainer.batch
    s = hook.size
    assert images.shape[-2:] == (s, s) and s % 32 == 0
    assert torch.allclose(targets[0, 2:], torch.tensor([10.0, 20.0, 100.0, 120.0]) * s / 256)


def test_train_command_under_torchrun_two_processes(mini, tmp_path):
    """`torchrun --nproc_per_node=2 -m yolocompress.cli train` (gloo on CPU) writes one valid run."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "yolocompress.cli", "train",
           "--config", str(mini / "exp.yaml"), "name=ddp", "train.epochs=1", "train.device=cpu",
           f"train.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp" / "baseline"
    best = load_artifact(run / "best.pt")
    assert best["stage"] == "baseline" and (run / "metrics.json").is_file()
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]
    assert proc.stdout.count("baseline: best map50_voc07") == 1     # rank 0 alone reports
