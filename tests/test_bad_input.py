"""Bad input through the real commands: one line `error: <file>[:<line>]: <problem>`, status 2, no
traceback, and no output written over an input or left half-written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from yolocompress.cli import main
from yolocompress.data.synthetic import DEMO_CLASSES

from conftest import ROOT, TINY_CFG, cfg_path, make_mini


def fails(capsys, *args: str) -> str:
    """Run the command; assert status 2 and exactly one stderr line 'error: ...'; return it."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:          # argparse exits itself
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def ok(capsys, *args: str) -> tuple[str, str]:
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr()
    return out.out, out.err


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("art") / "a.pt"
    assert main(["import-darknet", str(TINY_CFG), "--classes", "2", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, Path]:
    """(descriptor of a 12/6-image demo set at 64 px, an artifact with its classes)."""
    base = make_mini(tmp_path_factory.mktemp("mini"))
    names = base / "demo.names"
    names.write_text("\n".join(DEMO_CLASSES) + "\n")
    a = base / "nano.pt"
    assert main(["import-darknet", str(ROOT / "cfg/models/yolov4-nano.cfg"), "--names", str(names),
                 "--img-size", "64", "--out", str(a)]) == 0
    return base / "demo.yaml", a


def _images(folder: Path, names: dict[str, tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    out = []
    for name, (h, w) in names.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out.append(folder / name)
    return out


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


# --- outputs never replace inputs ------------------------------------------------------------------

def test_export_onto_its_own_artifact_is_refused(art, tmp_path, capsys):
    before = art.read_bytes()
    line = fails(capsys, "export", art, "--format", "onnx", "--out", art)
    assert line == (f"error: {art}: is the input {art}; writing it would destroy the input, "
                    f"choose another output path")
    link = tmp_path / "link.pt"
    link.symlink_to(art)                                    # the same file under another name
    assert "is the input" in fails(capsys, "export", link, "--format", "onnx", "--out", art)
    assert art.read_bytes() == before
    assert sorted(p.name for p in art.parent.iterdir()) == ["a.pt"]       # no temp file left
    named = tmp_path / "m.weights"                         # an artifact that darknet export would hit
    named.write_bytes(before)
    assert "is the input" in fails(capsys, "export", named, "--format", "darknet", "--out", tmp_path / "m")
    assert named.read_bytes() == before and not (tmp_path / "m.cfg").exists()


def test_predict_into_the_images_folder_is_refused(art, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", {"p.jpg": (40, 50), "q.png": (30, 30)})
    before = {p: p.read_bytes() for p in imgs}
    line = fails(capsys, "predict", art, tmp_path / "imgs", "--out", tmp_path / "imgs")
    assert "is the input" in line
    assert "is the input" in fails(capsys, "predict", art, imgs[1], "--out", tmp_path / "imgs")
    assert "is the input" in fails(capsys, "predict", art, imgs[0], "--out", tmp_path / "imgs" / ".." / "imgs")
    (tmp_path / "ln").symlink_to(tmp_path / "imgs")
    assert "is the input" in fails(capsys, "predict", art, tmp_path / "ln", "--out", tmp_path / "imgs")
    assert {p: p.read_bytes() for p in imgs} == before
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["p.jpg", "q.png"]


def test_predict_gives_images_with_the_same_stem_distinct_names(art, tmp_path, capsys):
    a = _images(tmp_path / "a", {"x.jpg": (40, 60)})[0]
    _images(tmp_path / "b", {"x.jpg": (64, 32), "x-2.png": (32, 32)})
    out = tmp_path / "out"
    ok(capsys, "predict", art, a, tmp_path / "b", a, "--out", out, "--conf-thresh", "0.0001",
       "--max-det", "5")
    # a/x.jpg keeps x (given twice: predicted once); b/x.jpg skips x-2, which b/x-2.png has
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "x-2.jpg", "x-3.jpg", "x.jpg"]
    assert cv2.imread(str(out / "x.jpg")).shape == (40, 60, 3)
    assert cv2.imread(str(out / "x-3.jpg")).shape == (64, 32, 3)
    assert cv2.imread(str(out / "x-2.jpg")).shape == (32, 32, 3)
    dets = json.loads((out / "detections.json").read_text())
    per = {i: [d for d in dets if d["image_id"] == i] for i in ("x", "x-2", "x-3")}
    assert all(len(v) == 5 for v in per.values())           # none merged, none lost
    assert max(d["bbox"][0] + d["bbox"][2] for d in per["x"]) <= 60 + 1e-3
    assert max(d["bbox"][1] + d["bbox"][3] for d in per["x-3"]) <= 64 + 1e-3


def test_import_darknet_and_eval_json_refuse_their_inputs(mini, tmp_path, capsys):
    names = tmp_path / "n.names"
    names.write_text("a\nb\n")
    assert "is the input" in fails(capsys, "import-darknet", TINY_CFG, "--names", names, "--out", names)
    assert names.read_text() == "a\nb\n"
    desc, a = mini
    assert "is the input" in fails(capsys, "eval", a, "--data", desc, "--json", desc)
    assert "is the input" in fails(capsys, "eval", a, "--data", desc, "--json", a)


# --- outputs below a file, or onto a folder ------------------------------------------------------------

def test_outputs_below_a_file_are_one_line_errors(art, mini, tmp_path, capsys):
    f = _file(tmp_path)
    img = _images(tmp_path / "i", {"i.png": (32, 32)})
    expect = f"cannot create the folder: {f} is a file"
    assert expect in fails(capsys, "export", art, "--format", "onnx", "--out", f / "m.onnx")
    assert expect in fails(capsys, "export", art, "--format", "darknet", "--out", f / "sub" / "m")
    assert expect in fails(capsys, "import-darknet", TINY_CFG, "--classes", "2", "--out", f / "x.pt")
    assert expect in fails(capsys, "predict", art, img[0], "--out", f / "pred")
    desc, a = mini
    assert expect in fails(capsys, "eval", a, "--data", desc, "--json", f / "e.json")
    assert expect in fails(capsys, "eval", a, "--data", desc, "--plots", f)
    assert "is a folder; give a file name" in fails(capsys, "export", art, "--format", "onnx",
                                                    "--out", tmp_path)
    assert f.read_text() == "x"


# --- arguments -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (("eval", "A", "--data", "D", "--img-size", "100"), "--img-size: must be a positive multiple of 32, got 100"),
    (("predict", "A", "I", "--out", "O", "--img-size", "0"), "--img-size: must be a positive multiple of 32, got 0"),
    (("info", "C", "--img-size", "-32"), "--img-size: must be a positive multiple of 32, got -32"),
    (("eval", "A", "--data", "D", "--batch-size", "0"), "--batch-size: must be >= 1, got 0"),
    (("eval", "A", "--data", "D", "--workers", "-1"), "--workers: must be >= 0, got -1"),
    (("info", "C", "--classes", "-3"), "--classes: must be >= 1, got -3"),
    (("import-darknet", "C", "--classes", "0", "--out", "x.pt"), "--classes: must be >= 1, got 0"),
    (("predict", "A", "I", "--out", "O", "--max-det", "0"), "--max-det: must be >= 1, got 0"),
    (("predict", "A", "I", "--out", "O", "--conf-thresh", "2"), "--conf-thresh: must be in [0, 1], got 2.0"),
    (("eval", "A", "--data", "D", "--iou-thresh", "x"), "--iou-thresh: expected a number, got 'x'"),
    (("eval", "A", "--data", "D", "--batch-size", "two"), "--batch-size: expected an integer, got 'two'"),
    (("export", "A", "--format", "onnx"), "the following arguments are required: --out"),
    (("export", "A", "--format", "onnx", "--out", ""), "--out: must be a path, got an empty string"),
    (("eval", "A", "--data", "D", "--json", " "), "--json: must be a path, got an empty string"),
    (("export", "A", "--format", "onnx", "--out", "x", "--opset", "0"), "--opset: must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line_errors(capsys, args, needle):
    line = fails(capsys, *args)
    assert line.startswith(f"error: yolocompress {args[0]}: ") and needle in line


# --- bad files -----------------------------------------------------------------------------------------

def test_import_darknet_bad_names_files(tmp_path, capsys):
    binary = tmp_path / "bin.names"
    binary.write_bytes(bytes(range(256)))
    assert fails(capsys, "import-darknet", TINY_CFG, "--names", binary, "--out", tmp_path / "x.pt") == \
        f"error: {binary}: not a text file of class names (not UTF-8)"
    nul = tmp_path / "nul.names"
    nul.write_bytes(b"cat\x00\x01\ndog\n")
    assert "control characters" in fails(capsys, "import-darknet", TINY_CFG, "--names", nul,
                                         "--out", tmp_path / "x.pt")
    dup = tmp_path / "dup.names"
    dup.write_text("cat\ncat\n")
    assert "class names repeated: cat" in fails(capsys, "import-darknet", TINY_CFG, "--names", dup,
                                                "--out", tmp_path / "x.pt")
    empty = tmp_path / "empty.names"
    empty.write_text("\n\n")
    assert "names file is empty" in fails(capsys, "import-darknet", TINY_CFG, "--names", empty,
                                          "--out", tmp_path / "x.pt")
    assert "no such names file" in fails(capsys, "import-darknet", TINY_CFG, "--names", tmp_path,
                                         "--out", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_import_darknet_defaults_to_the_cfgs_classes(tmp_path, capsys):
    out = tmp_path / "y.pt"
    _, err = ok(capsys, "import-darknet", cfg_path("yolov4-tiny"), "--out", out)
    assert err.strip() == (f"{cfg_path('yolov4-tiny')}: no --classes or --names: 80 classes as the "
                           f"cfg's [yolo] says, named class0..class79")
    from yolocompress.artifacts import load_artifact
    assert load_artifact(out)["classes"] == [f"class{i}" for i in range(80)]


def test_artifacts_with_malformed_fields(art, tmp_path, capsys):
    import torch
    d = torch.load(art, weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save({**d, "input_size": [100, "x"]}, bad)
    for cmd in (("info", bad), ("export", bad, "--format", "onnx", "--out", tmp_path / "m.onnx"),
                ("predict", bad, _images(tmp_path / "i", {"i.png": (32, 32)})[0], "--out", tmp_path / "p")):
        assert fails(capsys, *cmd) == (f"error: {bad}: input_size must be [height, width], each must "
                                       f"be a positive multiple of 32; got [100, 'x']")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "p").exists()


def test_bad_artifact_image_and_weights_files(art, tmp_path, capsys):
    text = tmp_path / "t.pt"
    text.write_text("hello\n")
    one = _images(tmp_path / "one", {"o.png": (32, 32)})[0]
    assert "not a readable artifact" in fails(capsys, "predict", text, one, "--out", tmp_path / "p")
    assert "no such artifact file" in fails(capsys, "export", tmp_path, "--format", "onnx", "--out", "x")
    fake = tmp_path / "imgs" / "fake.jpg"
    fake.parent.mkdir()
    fake.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    assert "fake.jpg: cannot read image" in fails(capsys, "predict", art, fake.parent,
                                                  "--out", tmp_path / "p")
    assert "t.pt: cannot read image" in fails(capsys, "predict", art, text, "--out", tmp_path / "p")
    empty = tmp_path / "none"
    empty.mkdir()
    assert "no images found in" in fails(capsys, "predict", art, empty, "--out", tmp_path / "p")
    short = tmp_path / "w.weights"
    short.write_bytes(b"\x00" * 8)
    assert "too short for a Darknet weights header" in fails(
        capsys, "import-darknet", TINY_CFG, short, "--classes", "2", "--out", tmp_path / "x.pt")
    assert "cannot read weights" in fails(capsys, "import-darknet", TINY_CFG, tmp_path, "--classes", "2",
                                          "--out", tmp_path / "x.pt")
    assert "opset 5 is too old" in fails(capsys, "export", art, "--format", "onnx", "--opset", "5",
                                         "--out", tmp_path / "m.onnx")
    assert "opset 99 is newer than this torch's exporter supports (13 to" in fails(
        capsys, "export", art, "--format", "onnx", "--opset", "99", "--out", tmp_path / "m.onnx")
    assert "give a file stem for the .cfg and .weights" in fails(
        capsys, "export", art, "--format", "darknet", "--out", "..")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "m.onnx").exists()


def test_bad_cfg_files(tmp_path, capsys):
    empty = tmp_path / "empty.cfg"
    empty.write_text("")
    binary = tmp_path / "bin.cfg"
    binary.write_bytes(bytes(range(256)))
    for f in (empty, binary, tmp_path, tmp_path / "missing.cfg"):
        line = fails(capsys, "info", f)
        assert line.startswith(f"error: {f}"), line
    assert fails(capsys, "import-darknet", empty, "--out", tmp_path / "x.pt").startswith(f"error: {empty}")


def test_data_demo_whose_root_is_a_file(tmp_path, capsys):
    f = _file(tmp_path)
    desc = tmp_path / "demo.yaml"
    desc.write_text(yaml.safe_dump({"format": "voc", "root": "a-file", "generate": "demo",
                                    "train": ["demo/train"], "val": ["demo/val"],
                                    "names": list(DEMO_CLASSES)}))
    assert fails(capsys, "data", "demo", "--data", desc) == \
        f"error: {desc}: data root {f} is a file, not a folder"
    assert f.read_text() == "x"


def test_eval_bad_descriptors_and_detections(mini, tmp_path, capsys):
    desc, a = mini
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert fails(capsys, "eval", "--detections", deep, "--data", desc) == \
        f"error: {deep}: JSON nested too deeply to be a detections file"
    for text, needle in (("{}", "a detections file is a JSON list"), ("[1]", "entry 0 is a int"),
                         ("not json", "not valid JSON"), ("", "not valid JSON")):
        bad = tmp_path / "d.json"
        bad.write_text(text)
        assert needle in fails(capsys, "eval", "--detections", bad, "--data", desc)
    assert "is a folder, not a detections file" in fails(capsys, "eval", "--detections", tmp_path,
                                                         "--data", desc)
    assert "no 'test' split" in fails(capsys, "eval", a, "--data", desc, "--split", "test")
    assert "give an ARTIFACT or --detections" in fails(capsys, "eval", "--data", desc)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)))
    for d in (binary, tmp_path, tmp_path / "missing.yaml"):
        assert fails(capsys, "eval", a, "--data", d).startswith(f"error: {d}: ")


def test_a_worker_error_is_one_line_through_eval(mini, tmp_path, capsys):
    desc, a = mini
    root = Path(yaml.safe_load(desc.read_text())["root"])
    data = tmp_path / "copy"
    import shutil
    shutil.copytree(desc.parent / root, data / root)
    (data / "demo.yaml").write_text(desc.read_text())
    victim = sorted((data / root).rglob("JPEGImages/*.jpg"))[-1]    # a val image: garbled body
    raw = victim.read_bytes()
    victim.write_bytes(raw[:300] + bytes(len(raw) - 300))
    line = fails(capsys, "eval", a, "--data", data / "demo.yaml", "--workers", "2")
    assert line.endswith(f"{victim.name}: cannot read image (missing, unreadable or not an image)"), line


def test_no_traceback_through_the_real_entry_point(art):
    r = subprocess.run([sys.executable, "-m", "yolocompress.cli", "export", str(art), "--format", "onnx",
                        "--out", str(art)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is the input" in r.stderr, r.stderr


def test_a_garbled_training_image_is_skipped_and_reported_once(tmp_path, capsys, caplog):
    from conftest import CHAIN_TRAIN
    base = make_mini(tmp_path, train=CHAIN_TRAIN)
    voc = next((base / "demo").glob("VOC*"))
    first = (voc / "ImageSets" / "Main" / "train.txt").read_text().split()[0]
    victim = voc / "JPEGImages" / f"{first}.jpg"
    raw = victim.read_bytes()
    victim.write_bytes(raw[:300] + bytes(len(raw) - 300))     # header intact, body garbled
    exp = base / "exp.yaml"
    assert "strict" not in exp.read_text()
    line = fails(capsys, "train", "--config", exp, "data.strict=true")
    assert line == f"error: {victim}: cannot read image (missing, unreadable or not an image)"
    with caplog.at_level("WARNING", logger="yolocompress.data"):
        assert main(["train", "--config", str(exp), "train.epochs=2"]) == 0   # default: not strict
    notes = [r.getMessage() for r in caplog.records if "cannot read image" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith(f"{victim}: cannot read image"), notes
    assert "next readable image in its place (1 bad image(s) so far" in notes[0]
    assert (base / "runs" / "exp" / "baseline" / "best.pt").is_file()


def test_the_demo_experiment_leaves_data_strict_at_its_default():
    from yolocompress.config import DataConfig, load_config
    assert DataConfig().strict is False
    text = (ROOT / "cfg" / "experiments" / "demo.yaml").read_text()
    assert "strict" not in text and load_config(ROOT / "cfg/experiments/demo.yaml").data.strict is False
