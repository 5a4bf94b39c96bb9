"""The demo data set: deterministic bytes, VOC layout, tight boxes, balanced classes, difficult flags."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from yolocompress.data import synthetic
from yolocompress.data.synthetic import DEMO_CLASSES, MARKER, generate_demo, render_image
from yolocompress.errors import YoloCompressError

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(xml_path: Path) -> list[tuple[str, list[int], int]]:
    r = ET.parse(xml_path).getroot()
    return [(o.findtext("name"), [int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")],
             int(o.findtext("difficult"))) for o in r.iter("object")]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "set", seed=0, n_train=6, n_val=2, img_size=128)


def test_layout_and_split_lists(small_set):
    base = small_set / "VOCdemo"
    train = (base / "ImageSets/Main/train.txt").read_text().split()
    val = (base / "ImageSets/Main/val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 2 and not set(train) & set(val)
    for image_id in train + val:
        assert (base / "JPEGImages" / f"{image_id}.jpg").read_bytes()[:2] == b"\xff\xd8"
        root = ET.parse(base / "Annotations" / f"{image_id}.xml").getroot()
        assert root.findtext("size/width") == "128" and root.findtext("size/height") == "128"
        assert root.findall("object")
    assert (small_set / MARKER).is_file()
    assert not [p for p in small_set.parent.iterdir() if ".tmp-" in p.name]


def test_same_seed_is_byte_identical_and_other_seed_differs(small_set, tmp_path):
    again = generate_demo(tmp_path / "again", seed=0, n_train=6, n_val=2, img_size=128)
    assert _files(again) == _files(small_set)
    other = generate_demo(tmp_path / "other", seed=1, n_train=6, n_val=2, img_size=128)
    a, b = _files(small_set), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".jpg"))


def test_boxes_are_tight_bounds_of_visible_pixels_inside_the_image():
    for seed in range(8):
        img, objects, inst = render_image(np.random.default_rng(seed), 160, 96)
        assert img.shape == (96, 160, 3) and img.dtype == np.uint8
        assert objects and inst.max() == len(objects)
        for k, o in enumerate(objects, start=1):
            ys, xs = np.nonzero(inst == k)
            assert o.box == (xs.min(), ys.min(), xs.max(), ys.max())
            assert 0 <= o.box[0] <= o.box[2] < 160 and 0 <= o.box[1] <= o.box[3] < 96


def test_boxes_bound_exactly_the_painted_object_pixels(monkeypatch):
    # Paint object k in a unique flat colour, without clutter or blur, and find it again in the image.
    painted = []

    def flat(rng, colour, shape):
        painted.append(np.array([len(painted) + 1, 7, 250 - len(painted)], np.uint8))
        return np.broadcast_to(painted[-1], shape + (3,)).copy()

    monkeypatch.setattr(synthetic, "_texture", flat)
    monkeypatch.setattr(synthetic, "_draw_clutter", lambda *a, **k: None)
    monkeypatch.setattr(synthetic.cv2, "GaussianBlur", lambda img, *a: img)
    for seed in range(6):
        painted.clear()
        img, objects, _ = render_image(np.random.default_rng(seed), 128, 128)
        assert len(painted) == len(objects)
        for colour, o in zip(painted, objects):
            ys, xs = np.nonzero((img == colour).all(-1))
            assert o.box == (xs.min(), ys.min(), xs.max(), ys.max())


def test_xml_matches_rendered_objects_one_based(small_set):
    image_id = "train_000003"
    _, objects, _ = render_image(np.random.default_rng([0, 0, 3]), 128, 128)
    parsed = _objects(small_set / "VOCdemo/Annotations" / f"{image_id}.xml")
    assert parsed == [(DEMO_CLASSES[o.label], [v + 1 for v in o.box], int(o.difficult)) for o in objects]


def test_classes_balanced_and_some_difficult(tmp_path):
    root = generate_demo(tmp_path / "d", seed=0, n_train=40, n_val=1, img_size=128)
    objs = [o for p in sorted((root / "VOCdemo/Annotations").glob("*.xml")) for o in _objects(p)]
    counts = Counter(name for name, _, _ in objs)
    assert set(counts) == set(DEMO_CLASSES)
    assert min(counts.values()) >= 0.5 * len(objs) / len(DEMO_CLASSES)
    n_difficult = sum(d for _, _, d in objs)
    assert 0 < n_difficult < 0.25 * len(objs)


def test_existing_set_is_reused_and_other_parameters_need_force(small_set, tmp_path):
    root = generate_demo(tmp_path / "r", seed=3, n_train=1, n_val=1, img_size=64)
    marker_time = (root / MARKER).stat().st_mtime_ns
    assert generate_demo(root, seed=3, n_train=1, n_val=1, img_size=64) == root
    assert (root / MARKER).stat().st_mtime_ns == marker_time
    with pytest.raises(YoloCompressError, match="other parameters"):
        generate_demo(root, seed=4, n_train=1, n_val=1, img_size=64)
    generate_demo(root, seed=4, n_train=1, n_val=1, img_size=64, force=True)
    assert '"seed": 4' in (root / MARKER).read_text()


def test_refuses_foreign_folder_and_bad_sizes(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(YoloCompressError, match="not a demo data set"):
        generate_demo(tmp_path / "mine", n_train=1, n_val=1, img_size=64)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(YoloCompressError, match="img_size"):
        generate_demo(tmp_path / "x", n_train=1, n_val=1, img_size=16)


def test_ensure_demo_uses_cache_env(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(synthetic, "generate_demo", lambda root, seed: calls.append((root, seed)) or root)
    monkeypatch.setenv("YOLOCOMPRESS_CACHE", str(tmp_path))
    assert synthetic.ensure_demo() == tmp_path / f"demo-v{synthetic.DEMO_VERSION}-seed0"
    assert synthetic.ensure_demo(tmp_path / "c") == tmp_path / "c" / f"demo-v{synthetic.DEMO_VERSION}-seed0"
    assert [s for _, s in calls] == [0, 0]


def test_descriptor_describes_the_demo_set():
    desc = yaml.safe_load((REPO / "data/demo.yaml").read_text())
    assert desc["format"] == "voc"
    assert desc["names"] == list(DEMO_CLASSES)
    assert desc["train"] == [f"{synthetic.DEMO_YEAR}/train"] and desc["val"] == [f"{synthetic.DEMO_YEAR}/val"]
    assert Path(desc["root"]).name == synthetic.demo_root("/x").name
