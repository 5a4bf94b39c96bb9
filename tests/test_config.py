"""Experiment config: defaults, YAML, dotted overrides, unknown keys, validation, _base_, round trips."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from yolocompress.config import (
    Config,
    TrainConfig,
    config_from_dict,
    dump_yaml,
    load_config,
)
from yolocompress.errors import YoloCompressError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "cfg" / "experiments"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def exp(tmp_path: Path) -> Path:
    return write(tmp_path / "exp.yaml", "model:\n  img_size: 320\ntrain:\n  lr: 0.01\n  steps: [0.5, 0.75]\n")


def test_defaults():
    c = Config()
    assert c.name is None and c.source is None
    m = c.model
    assert (m.img_size, m.classes, m.weights, m.letterbox) == (416, None, None, None)
    t = c.train
    assert (t.nominal_batch, t.lr, t.momentum, t.weight_decay) == (64, 0.0013, 0.949, 0.0005)
    assert (t.burn_in, t.burn_in_power, t.steps, t.scales) == (1000, 4.0, (0.8, 0.9), 0.1)
    assert (t.optimizer, t.schedule, t.amp, t.device) == ("sgd", "steps", None, "auto")
    a = c.augment
    assert (a.mosaic, a.hsv_h, a.hsv_s, a.hsv_v, a.flip, a.jitter) == (0.5, 0.1, 1.5, 1.5, 0.5, 0.3)
    assert (a.translate, a.degrees) == (0.0, 0.0)
    e = c.eval
    assert (e.metric, e.conf_thresh, e.nms_iou, e.max_det) == ("voc07", 0.005, 0.45, 300)


def test_empty_yaml_gives_defaults_named_after_the_file(tmp_path):
    c = load_config(write(tmp_path / "my-exp.yaml", "# nothing\n"))
    assert c.name == "my-exp"
    assert c.source == os.path.abspath(tmp_path / "my-exp.yaml")
    assert replace(c, name=None, source=None) == Config()


def test_yaml_values_override_defaults(exp):
    c = load_config(exp)
    assert c.model.img_size == 320
    assert c.train.lr == 0.01 and c.train.steps == (0.5, 0.75)
    assert c.train.epochs == TrainConfig().epochs  # untouched keys keep their default


def test_yaml_float_without_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; the float field still accepts it.
    c = load_config(write(tmp_path / "e.yaml", "train:\n  lr: 1e-3\n  weight_decay: 5e-4\n"))
    assert c.train.lr == 0.001 and c.train.weight_decay == 0.0005


def test_overrides_convert_to_declared_types(exp):
    c = load_config(exp, [
        "train.epochs=7", "train.lr=0.02", "train.ema=false", "train.multi_scale=True",
        "model.weights=null", "model.classes=3", "train.steps=[0.7,0.9]", "train.optimizer=adamw",
        "train.grad_clip=10", "name=2024", "model.letterbox=true", "eval.metric=coco",
        "train.amp=~",
    ])
    assert c.train.epochs == 7 and type(c.train.epochs) is int
    assert c.train.lr == 0.02
    assert c.train.ema is False and c.train.multi_scale is True
    assert c.model.weights is None and c.model.classes == 3 and c.model.letterbox is True
    assert c.train.steps == (0.7, 0.9)
    assert c.train.optimizer == "adamw" and c.eval.metric == "coco"
    assert c.train.grad_clip == 10.0 and type(c.train.grad_clip) is float
    assert c.name == "2024"  # a string field keeps the text, YAML would have made it an int
    assert c.train.amp is None
    assert c.model.img_size == 320  # the file's value survives unrelated overrides


def test_override_replaces_file_value_and_sets_path(exp):
    c = load_config(exp, ["model.img_size=608", "model.weights=w/yolov4.weights"])
    assert c.model.img_size == 608 and c.model.weights == "w/yolov4.weights"


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "override train.epochs=abc: expected an integer, got 'abc'"),
    ("train.epochs=2.5", "override train.epochs=2.5: expected an integer, got 2.5"),
    ("train.lr=fast", "override train.lr=fast: expected a finite number, got 'fast'"),
    ("train.lr=nan", "expected a finite number"),
    ("train.ema=maybe", "override train.ema=maybe: expected true or false, got 'maybe'"),
    ("train.ema=1", "expected true or false, got 1"),
    ("train.steps=0.7", "expected a list of numbers, e.g. [0.8, 0.9], got 0.7"),
    ("train.steps=[0.7,x]", "expected a list of numbers"),
    ("train.optimizer=sgdd", "expected one of 'sgd', 'adam', 'adamw', got 'sgdd'"),
    ("model.classes=many", "expected an integer or null, got 'many'"),
    ("train.epochs=null", "expected an integer, got null"),
])
def test_bad_override_type(exp, override, message):
    with pytest.raises(YoloCompressError) as e:
        load_config(exp, [override])
    assert message in str(e.value)
    assert str(exp) in str(e.value)


def test_unknown_key_in_yaml_suggests_closest(tmp_path):
    path = write(tmp_path / "demo.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(YoloCompressError, match=r"^.*demo.yaml:2: unknown key 'train.lrr' "
                       r"\(did you mean 'train.lr'\?\)$"):
        load_config(path)


@pytest.mark.parametrize("yaml_text, key, suggestion", [
    ("trian:\n  lr: 0.1\n", "trian", "train"),
    ("train:\n  mosaic: 0.2\n", "train.mosaic", "augment.mosaic"),   # right key, wrong section
    ("lr: 0.1\n", "lr", "train.lr"),
    ("model:\n  img: 320\n", "model.img", "model.img_size"),
])
def test_unknown_key_suggestions(tmp_path, yaml_text, key, suggestion):
    with pytest.raises(YoloCompressError, match=rf"unknown key '{key}' .*did you mean '{suggestion}'"):
        load_config(write(tmp_path / "e.yaml", yaml_text))


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    with pytest.raises(YoloCompressError) as e:
        load_config(write(tmp_path / "e.yaml", "train:\n  zzzqqq: 1\n"))
    assert str(e.value).endswith("e.yaml:2: unknown key 'train.zzzqqq'")


def test_unknown_key_in_override(exp):
    with pytest.raises(YoloCompressError, match=r"^.*exp.yaml: override 'train.lrr=0.1': unknown key "
                       r"'train.lrr' \(did you mean 'train.lr'\?\)$"):
        load_config(exp, ["train.lrr=0.1"])
    with pytest.raises(YoloCompressError, match=r"unknown key 'train.lr.x'"):
        load_config(exp, ["train.lr.x=1"])


@pytest.mark.parametrize("override, message", [
    ("train.lr", "is not of the form key=value"),
    ("=3", "is not of the form key=value"),
    ("train=3", "'train' is a section"),
    ("source=/x.yaml", "'source' is set by load_config"),
])
def test_malformed_overrides(exp, override, message):
    with pytest.raises(YoloCompressError, match=message):
        load_config(exp, [override])


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  epochs: 0\n", "train.epochs: must be >= 1, got 0"),
    ("train:\n  batch_size: -2\n", "train.batch_size: must be >= 1, got -2"),
    ("train:\n  lr: 0\n", "train.lr: must be > 0, got 0.0"),
    ("augment:\n  mosaic: 1.5\n", "augment.mosaic: must be a probability in [0, 1], got 1.5"),
    ("augment:\n  hsv_s: 0.5\n", "augment.hsv_s: must be >= 1 (1 = off), got 0.5"),
    ("train:\n  steps: [0.9, 0.8]\n", "train.steps: must be increasing fractions in (0, 1)"),
    ("train:\n  steps: [0.5, 1.0]\n", "train.steps: must be increasing fractions in (0, 1)"),
    ("train:\n  schedule: linear\n", "train.schedule: expected one of 'steps', 'cosine', got 'linear'"),
    ("train:\n  device: gpu\n", "train.device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("model:\n  img_size: 300\n", "model.img_size: must be a positive multiple of 32, got 300"),
    ("eval:\n  metric: voc\n", "eval.metric: expected one of 'voc07', 'voc12', 'coco', got 'voc'"),
    ("eval:\n  nms_iou: 0\n", "eval.nms_iou: must be in (0, 1], got 0.0"),
    ("train:\n  ema: yes please\n", "train.ema: expected true or false, got 'yes please'"),
    ("train: 5\n", "train: expected a mapping of train keys, got 5"),
    ("name: a/b\n", "name: must be letters, digits"),
    ("prune:\n  recalibrate: -1\n", "prune.recalibrate: must be >= 0, got -1"),
    ("prune:\n  search_images: 0\n", "prune.search_images: must be >= 1, got 0"),
    ("prune:\n  score_step: 1\n", "prune.score_step: must be in (0, 1), got 1.0"),
    ("prune:\n  allocation: importance\n  budget_method: evolve\n",
     "prune.budget_method: 'evolve' needs allocation loss or map, got 'evolve'"),
    ("prune:\n  search_rounds: 0\n", "prune.search_rounds: must be >= 1, got 0"),
    ("prune:\n  importance: taylor\n", "prune.importance: expected one of 'bn_gamma_abs'"),
])
def test_validation_errors_name_file_and_key(tmp_path, yaml_text, message):
    path = write(tmp_path / "bad.yaml", yaml_text)
    with pytest.raises(YoloCompressError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:{yaml_text.count(chr(10))}: {message}")  # the key's line
    assert "\n" not in str(e.value)
    assert e.value.__cause__ is not None  # chained, not swallowed


def test_direct_construction_validates():
    with pytest.raises(YoloCompressError, match="epochs: must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(YoloCompressError, match="optimizer: expected one of"):
        TrainConfig(optimizer="lion")
    assert TrainConfig(steps=[0.5, 0.6]).steps == (0.5, 0.6)  # lists become tuples: hashable, frozen


def test_bad_files(tmp_path):
    with pytest.raises(YoloCompressError, match="experiment file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(YoloCompressError, match=r"invalid YAML: [^\n]*$"):
        load_config(write(tmp_path / "broken.yaml", "train: [1,\n"))
    with pytest.raises(YoloCompressError, match="expected a mapping of sections at the top, got"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(YoloCompressError, match="'source' is set by load_config"):
        load_config(write(tmp_path / "src.yaml", "source: x.yaml\n"))


def test_base_inheritance_deep_merges(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml",
          "name: base-name\nmodel:\n  img_size: 320\n  classes: 5\ntrain:\n  lr: 0.02\n  epochs: 9\n")
    write(tmp_path / "sub" / "mid.yaml", "_base_: ../base.yaml\ntrain:\n  epochs: 11\n")
    child = write(tmp_path / "sub" / "child.yaml", "_base_: mid.yaml\nmodel:\n  img_size: 512\naugment:\n")
    c = load_config(child, ["train.lr=0.03"])
    assert c.model.img_size == 512 and c.model.classes == 5  # merged key by key, not section by section
    assert c.train.epochs == 11 and c.train.lr == 0.03       # nearest file wins, overrides win last
    assert c.augment == Config().augment                      # an empty section keeps the defaults
    assert c.name == "child"                                  # a base's name is not inherited
    assert c.source == os.path.abspath(child)


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(YoloCompressError, match=r"_base_ cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(YoloCompressError, match="_base_ cycle: self.yaml -> self.yaml"):
        load_config(write(tmp_path / "self.yaml", "_base_: self.yaml\n"))
    with pytest.raises(YoloCompressError, match=r"_base_ file .*nope.yaml not found"):
        load_config(write(tmp_path / "c.yaml", "_base_: nope.yaml\n"))


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epochz: 3\n")
    with pytest.raises(YoloCompressError, match=r"base.yaml:2: unknown key 'train.epochz' "
                       r"\(did you mean 'train.epochs'\?\)"):
        load_config(write(tmp_path / "child.yaml", "_base_: base.yaml\n"))


def test_to_dict_round_trip(exp):
    c = load_config(exp, ["model.weights=w.conv.137", "train.amp=true"])
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON-able data
    assert d["train"]["steps"] == [0.5, 0.75] and d["model"]["weights"] == "w.conv.137"
    assert config_from_dict(d) == c
    assert config_from_dict(json.loads(json.dumps(d))) == c


def test_config_from_dict_validates():
    d = Config().to_dict()
    d["train"]["lr"] = -1
    with pytest.raises(YoloCompressError, match=r"^config dict: train.lr: must be > 0, got -1.0$"):
        config_from_dict(d)
    d = Config().to_dict()
    d["train"]["lrr"] = 1
    with pytest.raises(YoloCompressError, match="^config dict: unknown key 'train.lrr'"):
        config_from_dict(d)
    with pytest.raises(YoloCompressError, match="expected a mapping"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_path_rule(tmp_path, monkeypatch):
    exp_dir, work = tmp_path / "exps", tmp_path / "work"
    exp_dir.mkdir(), work.mkdir()
    write(exp_dir / "beside.cfg", "[net]\n")
    write(exp_dir / "both.cfg", "[net]\n")
    write(work / "both.cfg", "[net]\n")
    path = write(exp_dir / "e.yaml", "model:\n  cfg: beside.cfg\n  weights: w/none.weights\n"
                 "data:\n  descriptor: both.cfg\n")
    monkeypatch.chdir(work)
    c = load_config(path)
    assert c.cfg_path == exp_dir / "beside.cfg"          # exists beside the YAML
    assert c.data_path == exp_dir / "both.cfg"           # the YAML's folder wins over the cwd
    assert c.weights_path == work / "w" / "none.weights"  # exists nowhere: relative to the cwd
    assert c.model.cfg == "beside.cfg" and c.to_dict()["model"]["cfg"] == "beside.cfg"
    assert Config(model=replace(Config().model, weights=None)).weights_path is None
    assert c.resolve_path(str(tmp_path / "abs.cfg")) == tmp_path / "abs.cfg"
    assert Config().resolve_path("x/y.cfg") == work / "x" / "y.cfg"  # no source: the cwd
    assert c.require_file("model.cfg") == exp_dir / "beside.cfg"
    with pytest.raises(YoloCompressError, match=r"model.weights file 'w/none.weights' not found "
                       r"\(looked for .*exps/w/none.weights and .*work/w/none.weights\)"):
        c.require_file("model.weights")
    with pytest.raises(YoloCompressError, match="is not a path key"):
        c.require_file("train.lr")


def test_dump_yaml_round_trip(exp, tmp_path, monkeypatch):
    write(exp.parent / "here.cfg", "[net]\n")
    c = load_config(exp, ["model.cfg=here.cfg", "train.epochs=3"])
    out_dir = tmp_path / "runs" / "exp"
    out_dir.mkdir(parents=True)
    monkeypatch.chdir(out_dir)  # loading the dump from elsewhere still finds the same files
    dump_yaml(c, out_dir / "config.yaml")
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.yaml"]  # no temp file left
    back = load_config(out_dir / "config.yaml")
    assert back.cfg_path == c.cfg_path and back.data_path == c.data_path
    assert back.name == c.name == "exp"
    assert replace(back, source=None, model=c.model, data=c.data) == replace(c, source=None)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(YoloCompressError, match="cannot create the folder: .*a-file is a file"):
        dump_yaml(c, tmp_path / "a-file" / "dir.yaml")


@pytest.mark.parametrize("name", ["demo", "demo-converged", "voc-yolov4", "wildlife-yolov4",
                                  "yolov4-416-latency"])
def test_shipped_experiments_validate(name):
    c = load_config(EXPERIMENTS / f"{name}.yaml")
    assert c.name == name
    assert config_from_dict(c.to_dict()) == c


def test_shipped_experiment_recipes():
    demo = load_config(EXPERIMENTS / "demo.yaml")
    assert Path(demo.cfg_path).name == "yolov4-nano.cfg" and demo.model.img_size == 256
    assert demo.train.nominal_batch == demo.train.batch_size == 16
    # demo-converged: demo.yaml's recipe continued from the shipped baseline at half the lr
    conv = load_config(EXPERIMENTS / "demo-converged.yaml")
    assert conv.weights_path == demo.resolve_path(demo.pipeline.baseline)
    assert conv.pipeline.baseline is None and conv.train.lr == demo.train.lr / 2
    assert replace(conv.train, lr=demo.train.lr) == demo.train
    assert (conv.sparse, conv.prune, conv.distill, conv.augment) == \
        (demo.sparse, demo.prune, demo.distill, demo.augment)
    voc = load_config(EXPERIMENTS / "voc-yolov4.yaml")
    t = voc.train
    assert (t.lr, t.momentum, t.weight_decay, t.burn_in) == (0.0013, 0.949, 0.0005, 1000)
    assert voc.train.nominal_batch == 64 and voc.train.steps == (0.8, 0.9) and voc.train.scales == 0.1
    # epochs ~= Darknet max_batches * 64 / n_images
    assert abs(voc.train.epochs - 40000 * 64 / 16551) < 1
    # issue 15's speed-only latency budget: AlexeyAB's yolov4 at 416, 40 % less latency
    lat = load_config(EXPERIMENTS / "yolov4-416-latency.yaml")
    assert Path(lat.cfg_path).name == "yolov4.cfg" and lat.model.img_size == 416
    assert (lat.prune.budget_target, lat.prune.budget_ratio, lat.prune.recalibrate) == \
        ("latency", 0.4, 0)
    wild = load_config(EXPERIMENTS / "wildlife-yolov4.yaml")
    assert wild.data.descriptor.endswith("wildlife.yaml") and wild.model.cfg == voc.model.cfg
    assert wild.train.lr == voc.train.lr and wild.augment == voc.augment
    assert abs(wild.train.epochs - max(13 * 2000, 1000, 6000) * 64 / 1000) < 1


def test_a_bad_value_names_the_file_and_line_that_set_it(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epochs: 3\n  lr: -1\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n\ntrain:\n  epochs: 0\n")
    with pytest.raises(YoloCompressError, match=r"^.*child.yaml:4: train.epochs: must be >= 1, got 0$"):
        load_config(child)
    with pytest.raises(YoloCompressError, match=r"^.*base.yaml:3: train.lr: must be > 0, got -1.0$"):
        load_config(child, ["train.epochs=2"])
    with pytest.raises(YoloCompressError, match=r"^.*child.yaml: override 'train.lr=-2': train.lr: must "
                                                r"be > 0, got -2.0$"):
        load_config(child, ["train.epochs=2", "train.lr=-2"])
    # a check over two keys names the section's line when the key itself is not written
    bad = write(tmp_path / "betas.yaml", "distill:\n  layers: [conv1]\n  betas: [1.0, 2.0]\n")
    with pytest.raises(YoloCompressError, match=r"^.*betas.yaml:3: distill.betas: must be empty or one"):
        load_config(bad)


def test_a_base_that_is_not_yaml_gets_a_short_message(tmp_path):
    other = write(tmp_path / "passwd", "".join(f"user{i}:x:{i}:{i}::/home/u{i}:/bin/sh\n" for i in range(50)))
    child = write(tmp_path / "c.yaml", f"_base_: {other}\n")
    with pytest.raises(YoloCompressError) as e:
        load_config(child)
    assert str(e.value) == (f"{other}: expected a mapping of sections at the top, got a string of "
                            f"{len(other.read_text()) - 1} characters")
    with pytest.raises(YoloCompressError, match=r"c2.yaml:1: _base_ must be a YAML file name, got a list"):
        load_config(write(tmp_path / "c2.yaml", "_base_: [a, b]\n"))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(YoloCompressError, match=r"bin.yaml: not a text \(UTF-8\) file$"):
        load_config(binary)
    with pytest.raises(YoloCompressError, match=r"is a folder, not an experiment file$"):
        load_config(tmp_path)


def test_a_base_in_another_folder_resolves_its_paths_against_its_own_folder(tmp_path, monkeypatch):
    shared, mine, work = tmp_path / "shared", tmp_path / "mine", tmp_path / "work"
    for d in (shared, mine, work):
        d.mkdir()
    write(shared / "net.cfg", "[net]\n")
    write(mine / "net.cfg", "[net]\n")          # a same-named file beside the child must not win
    write(shared / "data.yaml", "format: voc\n")
    write(shared / "base.yaml", "model:\n  cfg: net.cfg\n  weights: nowhere.weights\n"
          "data:\n  descriptor: data.yaml\n")
    child = write(mine / "child.yaml", "_base_: ../shared/base.yaml\n")
    monkeypatch.chdir(work)
    c = load_config(child)
    assert c.cfg_path == shared / "net.cfg" and c.data_path == shared / "data.yaml"
    assert c.model.weights == "nowhere.weights"             # exists nowhere: the rule's cwd fallback
    assert c.weights_path == work / "nowhere.weights"
    own = load_config(write(mine / "own.yaml", "_base_: ../shared/base.yaml\nmodel:\n  cfg: net.cfg\n"))
    assert own.cfg_path == mine / "net.cfg"                  # the child's own value, beside the child
    same = load_config(write(shared / "sib.yaml", "_base_: base.yaml\n"))
    assert same.model.cfg == "net.cfg"                       # same folder: the string is kept


def test_augment_jitter_has_one_rule_through_the_command(tmp_path, capsys):
    from yolocompress.cli import main
    assert main(["train", "--config", str(EXPERIMENTS / "demo.yaml"), "augment.jitter=0.6",
                 f"train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {EXPERIMENTS / 'demo.yaml'}: override 'augment.jitter=0.6': augment.jitter: "
                   f"must be in [0, 0.5), got 0.6"]
    assert not any(tmp_path.iterdir())


def test_runtime_classes_accept_every_edge_value_the_config_accepts(tmp_path):
    """config.py is the one place values are checked: whatever it lets through, the runtime classes
    built from it take (no second, stricter rule that turns into a traceback mid-run)."""
    import numpy as np
    import torch

    from yolocompress.compress.prune import MaskSettings
    from yolocompress.compress.sparsity import build_schedule
    from yolocompress.config import AugmentConfig, PruneConfig, SparseConfig
    from yolocompress.data.dataset import DetectionDataset
    from yolocompress.data.records import Record
    from yolocompress.train.ema import ModelEMA
    from yolocompress.train.hooks import LRSchedule

    edges = [dict(schedule=s, s=1e-9, switch_at=0.0, protect=p, decay=p, step_at=1e-6, step_factor=0.0,
                  warmup=w, final_ratio=p, target_fraction=f, target_threshold=1e-12, target_epoch=1)
             for s in ("local_decay", "constant", "step", "cosine", "linear", "target")
             for p, w, f in ((0.0, 0.0, 1e-6), (1.0, 0.999, 0.999999))]
    for e in edges:
        build_schedule(SparseConfig(**e), epochs=1)
    for keep, n in ((1.0, 1), (1e-9, 10 ** 6)):
        p = PruneConfig(min_keep=keep, min_channels=n, round_to=n, merge="union")
        MaskSettings(p.min_keep, p.min_channels, p.round_to, p.merge)
    for t in (TrainConfig(burn_in=0, burn_in_power=1e-9, steps=(), scales=1.0, schedule="cosine"),
              TrainConfig(steps=(1e-9, 0.999999), scales=1e-9, ema_decay=1e-9),
              TrainConfig(ema_decay=0.999999999)):
        LRSchedule(t.burn_in, t.burn_in_power, t.schedule, t.steps, t.scales, final_ratio=t.scales)
        ModelEMA(torch.nn.Linear(1, 1), decay=t.ema_decay)
    img = tmp_path / "i.png"
    import cv2
    cv2.imwrite(str(img), np.full((40, 60, 3), 90, np.uint8))
    records = [Record(str(img), 60, 40, [[5, 5, 30, 30]], [0])]
    for a in (AugmentConfig(mosaic=1.0, hsv_h=0.5, hsv_s=1.0, hsv_v=1.0, flip=1.0, jitter=0.4999,
                            translate=0.999, degrees=180.0),
              AugmentConfig(mosaic=0.0, hsv_s=100.0, hsv_v=100.0, jitter=0.0)):
        for letterbox in (False, True):
            ds = DetectionDataset(records, 32, a, letterbox=letterbox)
            for seed in range(20):
                ds.reseed(seed)
                im, targets, _ = ds[0]
                assert im.shape == (3, 32, 32) and torch.isfinite(targets).all()
