"""`yolocompress prune` end to end on a miniature demo set: the pruned artifact (stage, lineage,
a plan record that replays to it), its report, its exports, budget mode, settings, errors; and
the report helpers against hand-computed rows."""
from __future__ import annotations

import json
import re

import pytest
import torch

from yolocompress.artifacts import (artifact_from_model, build_model, file_sha256,
                                    load_artifact, save_artifact)
from yolocompress.cli import main
from yolocompress.compress.layer_prune import remove_units, residual_units, units_from_record
from yolocompress.compress.prune import replay
from yolocompress.compress.recalibrate import Calibration, recalibrate_bn
from yolocompress.config import load_config
from yolocompress.train.run import load_data
from yolocompress.data.synthetic import DEMO_CLASSES
from yolocompress.errors import YoloCompressError
from yolocompress.export import DecodedModel
from yolocompress.models.cfg import parse_cfg, read_cfg, write_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.profile import profile_summary
from yolocompress.models.roles import describe_layers
from yolocompress.report import (plot_channels_kept, plot_gamma_thresholds,
                                 prune_report_markdown, prune_summary_rows)

from conftest import ROOT, make_mini

GROUPS = ["G1", "G2", "G3", "G4", "G5"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A 12/6-image demo set at 64 px, an experiment on yolov4-nano (test_train_run's fixture),
    and "sparse"/"baseline"/"distilled" artifacts of one nano whose BN gammas are half ~1e-3
    (as after sparse training), with non-zero betas and statistics."""
    base = make_mini(tmp_path_factory.mktemp("mini"), train={"device": "cpu"})
    torch.manual_seed(0)
    model = Darknet(read_cfg(ROOT / "cfg/models/yolov4-nano.cfg"), classes=len(DEMO_CLASSES))
    model.initialize()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.weight.numel()
                gamma = torch.rand(n, generator=g) + 0.5
                gamma[torch.rand(n, generator=g) < 0.5] *= 1e-3
                mod.weight.copy_(gamma)
                mod.bias.uniform_(-0.2, 0.2, generator=g)
                mod.running_mean.uniform_(-0.3, 0.3, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
    for stage in ("sparse", "baseline", "distilled"):
        save_artifact(artifact_from_model(model, stage, list(DEMO_CLASSES), input_size=[64, 64]),
                      base / f"{stage}.pt")
    return base


def _prune(mini, *args):
    return main(["prune", "--config", str(mini / "exp.yaml"), *args])


_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _replays(src: dict, art: dict, compensate: bool) -> bool:
    """The record replays to the artifact; BN statistics excepted where it was recalibrated,
    conv weights and biases where it was reconstructed (test_reconstruction_* checks those)."""
    blocks, state = replay(parse_cfg(src["cfg"]), src["state_dict"], art["prune"], compensate)
    recal = art["prune"]["settings"]["recalibrate"]
    refit = art["prune"]["settings"]["reconstruct"]
    return write_cfg(blocks) == art["cfg"] and state.keys() == art["state_dict"].keys() and all(
        torch.equal(v, art["state_dict"][k]) for k, v in state.items()
        if not (recal and k.endswith(_STATS)) and not (refit and ".conv." in k))


def _recalibrated_replay(mini, src: dict, art: dict) -> dict:
    """The replayed model recalibrated by hand on the mini train split (as the stage must)."""
    config = load_config(mini / "exp.yaml")
    blocks, state = replay(parse_cfg(src["cfg"]), src["state_dict"], art["prune"], False)
    model = Darknet(blocks)
    model.load_state_dict(state)
    cal = Calibration.from_records(load_data(config).train, 400, 64, model.letterbox,
                                   config.eval.batch_size)
    return recalibrate_bn(model, cal).state_dict()


def test_prune_command_end_to_end(mini, tmp_path, capsys):
    # without reconstruction, so that the replay recalibrated by hand is the artifact
    sparse = mini / "sparse.pt"
    assert _prune(mini, "--from", str(sparse), "--latency-iters", "2",
                  "--latency-batches", "1,2", "prune.reconstruct=0") == 0
    printed = capsys.readouterr().out
    assert re.search(r"pruned \d+ of 72 prunable convs in [\d.]+ s \(masks [\d.]+ s, "
                     r"rebuild [\d.]+ s\)", printed)
    assert "warning" not in printed and "CPU latency b2" in printed
    run = mini / "runs" / "exp" / "pruned"
    art, src = load_artifact(run / "best.pt"), load_artifact(sparse)
    assert art["stage"] == "pruned" and art["parent"] == file_sha256(sparse)
    assert art["lineage"] == [{"stage": "sparse", "sha256": file_sha256(sparse),
                               "path": str(sparse.resolve())}]
    rec = art["prune"]
    assert rec["percents"] == dict(zip(GROUPS, (0.18, 0.50, 0.97, 0.865, 0.68)))
    assert list(rec["groups"]) == GROUPS and set(rec["thresholds"]) == set(GROUPS)
    assert rec["settings"]["compensate"] is False and rec["budget"] is None
    assert _replays(src, art, compensate=False) and rec["settings"]["recalibrate"] == 400
    by_hand = _recalibrated_replay(mini, src, art)
    assert all(torch.allclose(by_hand[k], v) for k, v in art["state_dict"].items())
    assert not torch.allclose(by_hand["layers.0.bn.running_var"],
                              src["state_dict"]["layers.0.bn.running_var"])

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recalibration"]["images"] == 12      # the whole mini train split
    assert "(compensation off, BN not recalibrated)" in printed
    before, after = (profile_summary(parse_cfg(a["cfg"]), 64, 64) for a in (src, art))
    assert metrics["before"]["params"] == before["params"] > after["params"] \
        == metrics["after"]["params"] == art["metrics"]["params"]
    assert metrics["before"]["flops"] == before["flops"] > after["flops"] \
        == metrics["after"]["flops"]
    assert set(metrics["compensation"]) == {"on", "off"}
    assert metrics["after"]["map50_voc07"] == metrics["compensation"]["off"]["map50_voc07"]
    assert [(lat["batch"], lat["after"]["threads"]) for lat in metrics["latency"]] == \
        [(1, 1), (2, 1)]
    assert all(lat[w]["ms_median"] > 0 for lat in metrics["latency"] for w in ("before", "after"))
    # per-group channel counts add up to the record's kept channels
    kept = {g["name"]: g["channels_after"] for g in metrics["groups"]}
    assert kept == {g: sum(len(rec["layers"][n]) for n in names)
                    for g, names in rec["groups"].items()}
    report = (run / "report.md").read_text()
    assert all(f"| {g}: " in report for g in GROUPS) and f"{after['params']:,}" in report
    for png in ("channels_kept.png", "gamma_thresholds.png"):
        assert (run / png).read_bytes()[:8] == PNG and f"({png})" in report

    # the pruned artifact exports to Darknet and comes back identical, and to ONNX
    stem = tmp_path / "pruned"
    assert main(["export", str(run / "best.pt"), "--format", "darknet", "--out", str(stem)]) == 0
    assert main(["import-darknet", str(stem.with_suffix(".cfg")), str(stem.with_suffix(".weights")),
                 "--classes", "6", "--out", str(tmp_path / "back.pt")]) == 0
    back = load_artifact(tmp_path / "back.pt")
    assert [b.options.get("filters") for b in parse_cfg(back["cfg"])] == \
        [b.options.get("filters") for b in parse_cfg(art["cfg"])]
    assert all(torch.equal(art["state_dict"][k], v) for k, v in back["state_dict"].items()
               if v.is_floating_point())
    capsys.readouterr()
    assert main(["export", str(run / "best.pt"), "--format", "onnx", "--out",
                 str(tmp_path / "pruned.onnx"), "--check"]) == 0
    diff = re.search(r"max abs diff (\S+)", capsys.readouterr().out)
    # relative to the largest output: the recalibrated random-weight nano decodes boxes of ~1e5 px
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # check_onnx's input
    with torch.no_grad():
        largest = DecodedModel(build_model(art)).eval()(x).abs().max().item()
    assert diff and float(diff[1]) < 1e-3 * max(largest, 1.0)


@pytest.mark.parametrize("metric,method", [("params", "greedy"), ("flops", "scale")])
def test_budget_mode_lands_within_one_percent(mini, tmp_path, capsys, metric, method):
    out = tmp_path / "budget.pt"
    assert _prune(mini, "--from", str(mini / "baseline.pt"), "--out", str(out),
                  "--latency-iters", "0", f"prune.budget_target={metric}",
                  "prune.budget_ratio=0.3", f"prune.budget_method={method}") == 0
    assert "warning: " in capsys.readouterr().out          # a baseline, not a sparse artifact
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    reached = 1 - metrics["after"][metric] / metrics["before"][metric]
    assert 0.3 <= reached <= 0.31
    art = load_artifact(out)
    assert art["prune"]["budget"]["reduction"] == pytest.approx(reached)
    assert art["prune"]["budget"]["method"] == method and metrics["latency"] == []
    assert _replays(load_artifact(mini / "baseline.pt"), art, compensate=False)


def test_latency_budget_by_evolution_scored_by_map(mini, tmp_path, monkeypatch):
    """A latency budget (torch table, cached under $YOLOCOMPRESS_CACHE), allocated by the
    evolution scored by mAP on the search images: the table predicts the target, the stage times
    the result, and the candidates are recorded."""
    monkeypatch.setenv("YOLOCOMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lat.pt"
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "--out", str(out),
                  "--latency-iters", "0", "prune.budget_target=latency", "prune.budget_ratio=0.3",
                  "prune.latency_backend=torch", "prune.latency_threads=1",
                  "prune.budget_method=evolve", "prune.allocation=map", "prune.search_rounds=3",
                  "prune.search_images=8") == 0
    budget = load_artifact(out)["prune"]["budget"]
    assert budget["metric"] == "latency" and 0.3 <= budget["reduction"] <= 0.32
    assert [c["generation"] for c in budget["candidates"]] == [0, 1, 1]
    assert all(-1 <= c["score"] <= 0 for c in budget["candidates"])       # minus an mAP
    check = budget["check"]
    assert check["backend"] == "torch" and check["threads"] == 1 and check["batch"] == 1
    assert 1 - check["predicted_after_ms"] / check["predicted_before_ms"] == \
        pytest.approx(budget["reduction"])
    assert check["before_ms"] > 0 and check["after_ms"] > 0
    assert len(list((tmp_path / "cache" / "latency").glob("latency-*.json"))) == 1


def test_one_percent_for_all_groups_l1_importance_no_compensation(mini, tmp_path):
    out = tmp_path / "p.pt"
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "--out", str(out), "--latency-iters",
                  "0", "prune.percents=[0.5]", "prune.compensate=false",
                  "prune.importance=l1_filter", "prune.round_to=8") == 0
    art = load_artifact(out)
    rec = art["prune"]
    assert rec["percents"] == dict.fromkeys(GROUPS, 0.5)
    assert rec["settings"]["importance"] == "l1_filter" and rec["settings"]["round_to"] == 8
    assert all(len(k) % 8 == 0 or len(k) == n
               for (name, k), (_, n) in zip(rec["layers"].items(), rec["filters"].values()))
    assert _replays(load_artifact(mini / "sparse.pt"), art, compensate=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["after"]["map"] == metrics["compensation"]["off"]["map"]
    assert "map_compensation_on" in art["metrics"]


def test_global_grouping_is_one_threshold_over_all_prunable_convs(mini, tmp_path):
    out = tmp_path / "g.pt"
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "--out", str(out), "--latency-iters",
                  "0", "prune.grouping=global", "prune.percents=[0.4]", "prune.min_keep=0.01",
                  "prune.min_channels=1", "prune.importance=bn_gamma_abs") == 0
    rec = load_artifact(out)["prune"]
    assert rec["percents"] == {"all": 0.4} and rec["settings"]["grouping"] == "global"
    assert set(rec["groups"]["all"]) == set(rec["layers"])   # every prunable conv, one group
    # one threshold over all of them: 40 % of all their |gamma| fall below it
    sparse = load_artifact(mini / "sparse.pt")
    index = {i.name: i.index for i in describe_layers(parse_cfg(sparse["cfg"]))}
    scores = torch.cat([sparse["state_dict"][f"layers.{index[n]}.bn.weight"].abs()
                        for n in rec["groups"]["all"]])
    assert float((scores < rec["thresholds"]["all"]).float().mean()) == pytest.approx(0.4, abs=0.01)
    assert _replays(sparse, load_artifact(out), compensate=False)


def test_prune_command_errors(mini, capsys):
    sparse = str(mini / "sparse.pt")
    cases = [
        (["--from", str(mini / "distilled.pt")], "a 'distilled' artifact; the source of pruned must be one of: sparse"),
        (["--from", sparse, "prune.percents=[0.1,0.2]"],
         "prune.percents has 2 values for the 5 groups G1, G2, G3, G4, G5"),
        (["--from", sparse, "prune.budget_target=params", "prune.budget_ratio=0.99"],
         "cannot remove 99.0% of the params"),
        (["--from", sparse, "prune.min_keep=0"], "prune.min_keep: must be in (0, 1]"),
        (["--from", sparse, "prune.percents=[0.5,1.5]"], "prune.percents: must be a non-empty"),
        (["--from", sparse, "prune.merge=any"], "prune.merge="),
        (["--from", sparse, "prune.budget_target=energy"], "prune.budget_target="),
        (["--from", str(mini / "missing.pt")], "no such artifact file"),
    ]
    for args, msg in cases:     # --force: past the complete stage of the first test
        assert _prune(mini, "--latency-iters", "0", "--force", *args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (args, err)


def test_layer_pruning_with_a_flops_budget_end_to_end(mini, tmp_path, capsys):
    out = tmp_path / "layers.pt"
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "--out", str(out), "--latency-iters",
                  "0", "prune.layers=2", "prune.budget_target=flops",
                  "prune.budget_ratio=0.3") == 0
    printed = capsys.readouterr().out
    src, art = load_artifact(mini / "sparse.pt"), load_artifact(out)
    src_blocks, blocks = parse_cfg(src["cfg"]), parse_cfg(art["cfg"])
    rec = art["prune"]
    # the two units of lowest mean |gamma| of the conv before the shortcut, by hand
    nano = residual_units(src_blocks)
    means = [float(src["state_dict"][f"layers.{u.last_conv}.bn.weight"].abs().mean())
             for u in nano]
    lowest = sorted(sorted(range(len(nano)), key=means.__getitem__)[:2])
    assert [u["shortcut"] for u in rec["units"]] == [f"shortcut{nano[i].shortcut}" for i in lowest]
    assert [u["score"] for u in rec["units"]] == pytest.approx([means[i] for i in lowest])
    assert rec["settings"]["layers"] == 2 and rec["settings"]["layer_importance"] == "bn_gamma_mean"
    assert len(blocks) == len(src_blocks) - 6
    assert sum(b.type == "shortcut" for b in blocks) == sum(b.type == "shortcut"
                                                            for b in src_blocks) - 2
    # the budget is the source's: the units' FLOPs count toward it
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    reached = 1 - metrics["after"]["flops"] / metrics["before"]["flops"]
    assert 0.3 <= reached <= 0.31 and rec["budget"]["reduction"] == pytest.approx(reached)
    assert rec["budget"]["channel_target"] < 0.3
    assert metrics["before"]["layers"] == len(src_blocks) - 1 and metrics["units"] == rec["units"]
    assert _replays(src, art, compensate=False)
    assert "removed 2 residual units: " + rec["units"][0]["shortcut"] in printed
    assert "layers (residual units removed)" in printed
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {u['shortcut']} | {u['input']} | {', '.join(u['convs'])} |" in report
               for u in rec["units"])


def test_layer_pruning_alone_and_by_calibration_loss(mini, tmp_path):
    out = tmp_path / "alone.pt"
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "--out", str(out), "--latency-iters",
                  "0", "prune.layers=1", "prune.percents=[0]", "prune.budget_target=null",
                  "prune.layer_importance=loss") == 0
    src, art = load_artifact(mini / "sparse.pt"), load_artifact(out)
    rec = art["prune"]
    assert rec["settings"]["layer_importance"] == "loss" and len(rec["units"]) == 1
    assert rec["units"][0]["score"] > 0
    # no channel pruned: the cfg is the source's without the unit's sections
    blocks = parse_cfg(src["cfg"])
    unit = units_from_record(blocks, rec["units"])
    assert write_cfg(parse_cfg(art["cfg"])) == write_cfg(remove_units(blocks, src["state_dict"],
                                                                      unit)[0])
    assert _replays(src, art, compensate=False)
    # the ordinary export path writes it as a Darknet cfg + weights that import back identical
    stem = tmp_path / "slim"
    assert main(["export", str(out), "--format", "darknet", "--out", str(stem)]) == 0
    assert main(["import-darknet", str(stem.with_suffix(".cfg")), str(stem.with_suffix(".weights")),
                 "--classes", "6", "--out", str(tmp_path / "back.pt")]) == 0
    back = load_artifact(tmp_path / "back.pt")
    assert [b.type for b in parse_cfg(back["cfg"])] == [b.type for b in parse_cfg(art["cfg"])]
    assert all(torch.equal(art["state_dict"][k], v) for k, v in back["state_dict"].items()
               if v.is_floating_point())


def test_layer_pruning_errors(mini, capsys):
    cases = [(["prune.layers=8"], "prune.layers=8, but the cfg has only 7 removable residual"),
             (["prune.layers=-1"], "prune.layers: must be >= 0"),
             (["prune.layers=7", "prune.budget_target=params", "prune.budget_ratio=0.01"],
              "prune.layers=7 alone removes")]
    for args, msg in cases:
        assert _prune(mini, "--from", str(mini / "sparse.pt"), "--latency-iters", "0",
                      "--force", *args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (args, err)


# ---- report helpers ---------------------------------------------------------------------------

def _metrics():
    stats = {"ms_median": 10.0}
    return {
        "artifact": "p.pt", "source": "s.pt", "source_stage": "sparse", "img_size": 64,
        "metric_key": "map50_voc07", "seconds": {"masks": 0.1, "prune": 0.2}, "budget": None,
        "settings": {"importance": "bn_gamma_abs", "merge": "majority", "min_keep": 0.1,
                     "min_channels": 8, "round_to": 1, "compensate": True},
        "before": {"params": 1000, "flops": 4_000_000_000, "map50_voc07": 0.5},
        "after": {"params": 400, "flops": 3_000_000_000, "map50_voc07": 0.45},
        "compensation": {"on": {"map50_voc07": 0.45}, "off": {"map50_voc07": 0.25}},
        "latency": [{"batch": 8, "before": stats, "after": {"ms_median": 8.0}}],
        "groups": [{"name": "G1", "title": "stem", "layers": 2, "percent": 0.5,
                    "threshold": None, "channels_before": 48, "channels_after": 24,
                    "params_before": 900, "params_after": 300, "flops_before": 3e9,
                    "flops_after": 2e9}],
        "layers": [{"name": "conv1", "group": "G1", "filters_before": 32, "filters_after": 16,
                    "params_before": 600, "params_after": 200, "flops_before": 2e9,
                    "flops_after": 1e9},
                   {"name": "conv2", "group": "", "filters_before": 16, "filters_after": 16,
                    "params_before": 300, "params_after": 100, "flops_before": 1e9,
                    "flops_after": 1e9}],
    }


def test_summary_rows_and_markdown_by_hand(tmp_path):
    m = _metrics()
    assert prune_summary_rows(m) == [
        ("params", "1,000", "400", "-60.0%"),
        ("BFLOPs", "4.000", "3.000", "-25.0%"),
        ("map50_voc07 (compensation on)", "0.5000", "0.4500", "-0.0500"),
        ("map50_voc07 (compensation off)", "", "0.2500", "-0.2500"),
        ("CPU latency b8 (ms, median)", "10.00", "8.00", "-20.0% (x1.25)"),
    ]
    md = prune_report_markdown(m, {"channels": "c.png"})
    assert "| G1: stem | 2 | 0.5 | - | 48 -> 24 | 900 -> 300 | 3000.0 -> 2000.0 |" in md
    assert "| conv2 | - | 16 -> 16 | 300 -> 100 | 1000.00 -> 1000.00 |" in md
    assert "![channels](c.png)" in md and "Budget mode" not in md
    m["budget"] = {"metric": "params", "target": 0.6, "reduction": 0.6, "method": "greedy",
                   "evaluations": 7}
    assert "remove 60.0% of the params (greedy); reached 60.00% after 7" in \
        prune_report_markdown(m)


def test_plots_write_pngs_and_reject_empty_input(tmp_path):
    m = _metrics()
    assert plot_channels_kept(m["layers"], tmp_path / "c.png").read_bytes()[:8] == PNG
    scores = {"G1": [0.0, 1e-3, 0.5, 1.0], "G2": [], "G3": [2.0, 3.0]}
    out = plot_gamma_thresholds(scores, {"G1": 0.2, "G2": None, "G3": None}, tmp_path / "g.png",
                                {"G1": 0.5, "G2": 0.5, "G3": 1.0})
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(YoloCompressError, match="no pruned layer to plot"):
        plot_channels_kept([m["layers"][1]], tmp_path / "x.png")
    with pytest.raises(YoloCompressError, match="no group has scores"):
        plot_gamma_thresholds({"G2": []}, {"G2": None}, tmp_path / "x.png")
    with pytest.raises(YoloCompressError, match="no threshold for group G3"):
        plot_gamma_thresholds(scores, {"G1": 0.2}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_reconstruction_refits_the_convs_and_reports_what_it_bought(mini, tmp_path, capsys):
    out = tmp_path / "rc" / "best.pt"
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "--out", str(out), "--latency-iters",
                  "0", "prune.reconstruct=4") == 0
    printed = capsys.readouterr().out
    assert re.search(r"reconstructed \d+ of \d+ convs on \d+ images in [\d.]+ s", printed)
    assert "(compensation off, not reconstructed)" in printed
    src, art = load_artifact(mini / "sparse.pt"), load_artifact(out)
    metrics = json.loads((out.parent / "metrics.json").read_text())
    rec = metrics["reconstruction"]
    refit = [c["layer"] for c in rec["convs"] if c["refitted"]]
    assert rec["images"] == 4 and refit and metrics["seconds"]["reconstruct"] > 0
    assert all(c["error_after"] <= c["error_before"] for c in rec["convs"])
    assert set(rec["off"]) == set(metrics["after"]) - {"params", "flops", "layers"}
    assert art["prune"]["settings"]["reconstruct"] == 4
    assert "Convs refitted to the unpruned model's outputs on 4 training images" in \
        (out.parent / "report.md").read_text()
    # the record still replays to the same cfg; the refitted convs' weights are new
    blocks, state = replay(parse_cfg(src["cfg"]), src["state_dict"], art["prune"], False)
    assert write_cfg(blocks) == art["cfg"]
    key = "layers.{}.conv.weight".format
    assert all(not torch.equal(state[key(i)], art["state_dict"][key(i)]) for i in refit)
    assert all(torch.equal(state[key(c["layer"])], art["state_dict"][key(c["layer"])])
               for c in rec["convs"] if not c["refitted"])
    # off: nothing refitted, the record replays to the weights
    plain = tmp_path / "plain" / "best.pt"
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "--out", str(plain),
                  "--latency-iters", "0", "prune.reconstruct=0") == 0
    off = json.loads((plain.parent / "metrics.json").read_text())["reconstruction"]
    assert off["images"] == 0 and off["convs"] == []
    assert "not reconstructed" not in capsys.readouterr().out


def test_reconstruction_errors(mini, capsys):
    assert _prune(mini, "--from", str(mini / "sparse.pt"), "prune.reconstruct=-1") == 2
    assert "prune.reconstruct: must be >= 0" in capsys.readouterr().err


def test_right_after_bench_scores_the_same_pruned_model_reconstructed(mini, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bench_prune_right_after", ROOT / "bench" / "bench_prune_right_after.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--config", str(mini / "exp.yaml"), "--sparse", str(mini / "sparse.pt"),
                       "--budgets", "0.5", "--arms", "ours:search_rounds=2", "tp",
                       "--reconstruct", "4", "--json", str(out), "prune.budget_target=flops"]) == 0
    rows = {r["arm"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ours:search_rounds=2", "ours:search_rounds=2+reconstruct=4", "tp"}
    plain, rc = rows["ours:search_rounds=2"], rows["ours:search_rounds=2+reconstruct=4"]
    assert rc["flops_reduction"] == plain["flops_reduction"] and rc["reconstruct_seconds"] > 0
    assert 0 <= rc["map50_voc07_recalibrated"] <= 1
