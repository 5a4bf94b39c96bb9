"""Data-set descriptors (yolocompress.data.descriptor) and the annotation cache: key checking, root
resolution, shipped descriptors, Darknet .data files, cache hits without parsing, invalidation."""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolocompress.data import cache as cache_mod
from yolocompress.data.descriptor import load_descriptor, load_split, load_split_with_issues
from yolocompress.errors import YoloCompressError

REPO = Path(__file__).resolve().parents[1]
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


@pytest.fixture(autouse=True)
def _local_cache(monkeypatch):
    monkeypatch.delenv("YOLOCOMPRESS_CACHE", raising=False)   # caches go to <root>/.yolocompress-cache


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_voc(root, boxes_by_id, year="2007", subset="trainval"):
    """A VOCdevkit year; boxes_by_id: id -> list of (name, xmin, ymin, xmax, ymax, difficult)."""
    base = Path(root) / f"VOC{year}"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for image_id, objects in boxes_by_id.items():
        cv2.imwrite(str(base / "JPEGImages" / f"{image_id}.jpg"), np.zeros((20, 32, 3), np.uint8))
        objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
                       f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                       for n, x1, y1, x2, y2, d in objects)
        write(base / "Annotations" / f"{image_id}.xml",
              f"<annotation><size><width>32</width><height>20</height></size>{objs}</annotation>")
    write(base / "ImageSets" / "Main" / f"{subset}.txt", "".join(f"{i}\n" for i in boxes_by_id))


def descriptor(folder, text):
    return load_descriptor(write(Path(folder) / "set.yaml", text))


@pytest.fixture
def voc_set(tmp_path):
    make_voc(tmp_path / "data" / "VOCdevkit", {"a": [("cat", 1, 1, 10, 10, 0), ("dog", 2, 2, 32, 20, 1)],
                                               "b": [("cat", 3, 4, 5, 6, 0)]})
    return descriptor(tmp_path / "cfg", "format: voc\nroot: ../data/VOCdevkit\ntrain: 2007/trainval\n"
                                        "names: [cat, dog]\n")


# ----------------------------------------------------------------------------- the descriptor file

def test_shipped_descriptors():
    voc = load_descriptor(REPO / "data" / "voc.yaml")
    assert voc.format == "voc" and voc.names == tuple(VOC_CLASSES)
    assert voc.train == ("2007/trainval", "2012/trainval") and voc.val == ("2007/test",) and voc.test is None
    assert voc.root == str(REPO / "datasets" / "VOCdevkit")
    wild = load_descriptor(REPO / "data" / "wildlife.yaml")
    assert wild.format == "voc-flat" and wild.train == ("train.txt",) and wild.val == ("valid.txt",)
    assert wild.names == ("giraffe", "person", "zebra", "elephant", "impala", "monkey", "lion", "leopard",
                          "crocodile", "buffalo", "hyena", "bird", "gorilla")
    assert wild.aliases == {"hyna": "hyena"}
    coco = load_descriptor(REPO / "data" / "coco-example.yaml")
    assert len(coco.names) == 80 and coco.names[0] == "person" and coco.names[-1] == "toothbrush"
    assert coco.val == (("annotations/instances_val2017.json", "val2017"),)


def test_root_is_relative_to_the_descriptor_with_user_and_env_expansion(tmp_path, monkeypatch):
    d = descriptor(tmp_path / "a" / "b", "format: yolo\nroot: ../sets/x\ntrain: t.txt\nnames: [n]\n")
    assert d.root == str(tmp_path / "a" / "sets" / "x")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "env"))
    assert descriptor(tmp_path, "format: yolo\nroot: ~/v\nval: t.txt\nnames: [n]\n").root == \
        str(tmp_path / "home" / "v")
    assert descriptor(tmp_path, "format: yolo\nroot: $DATA_DIR/v\nval: t.txt\nnames: [n]\n").root == \
        str(tmp_path / "env" / "v")


@pytest.mark.parametrize("text, message", [
    ("format: voc\nroot: r\ntrain: 2007/trainval\nnmes: [a]\n", "unknown key 'nmes'; did you mean 'names'?"),
    ("format: voc\nroot: r\nvalid: 2007/test\nnames: [a]\n", "unknown key 'valid'; did you mean 'val'?"),
    ("format: voc_flat\nroot: r\ntrain: t.txt\nnames: [a]\n", "unknown format 'voc_flat'; did you mean 'voc-flat'?"),
    ("format: voc\ntrain: 2007/trainval\nnames: [a]\n", "missing key 'root'"),
    ("format: voc\nroot: r\nnames: [a]\n", "no split given"),
    ("format: voc\nroot: r\ntrain: 2007/trainval\nnames: [a, b, a]\n", "class names repeated in 'names': a"),
    ("format: voc\nroot: r\ntrain: 2007/trainval\nnames: a\n", "'names' must be a non-empty list"),
    ("format: voc-flat\nroot: r\ntrain: t.txt\nnames: [a]\naliases: {b: c}\n", "'c' is not in names"),
    ("format: voc\nroot: r\ntrain: 2007-trainval\nnames: [a]\n", "is not YEAR/SET"),
    ("format: voc\nroot: r\ntrain: 2007/test\nnames: [yes, no]\n", "quote names YAML reads as"),
    ("- just a list\n", "a data descriptor is a mapping"),
    ("format: voc\n  root: [\n", "cannot read data descriptor"),
])
def test_descriptor_errors_name_the_file_and_problem(tmp_path, text, message):
    with pytest.raises(YoloCompressError, match="set.yaml: .*" + message.replace("?", r"\?")):
        descriptor(tmp_path, text)


def test_missing_root_and_missing_split_are_one_line_errors(tmp_path, voc_set):
    missing = descriptor(tmp_path, "format: voc\nroot: nowhere\nval: 2007/test\nnames: [a]\n")
    with pytest.raises(YoloCompressError) as err:
        load_split(missing, "val")
    assert "nowhere does not exist" in str(err.value) and "scripts/get_voc.sh" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(YoloCompressError, match=r"no 'test' split \(it has: train\)"):
        load_split(voc_set, "test")


def test_darknet_data_file(tmp_path):
    darknet = tmp_path / "darknet"
    (darknet / "data" / "obj" / "images").mkdir(parents=True)
    cv2.imwrite(str(darknet / "data" / "obj" / "images" / "p.jpg"), np.zeros((10, 20, 3), np.uint8))
    write(darknet / "data" / "obj" / "labels" / "p.txt", "1 0.5 0.5 0.5 0.5\n")
    write(darknet / "data" / "train.txt", "data/obj/images/p.jpg\n")
    write(darknet / "data" / "obj.names", "ant\nbee\n\n")
    data = write(darknet / "data" / "obj.data", "classes = 2\ntrain = data/train.txt\n"
                                                 "names = data/obj.names\nbackup = backup/  # comment\n")
    d = load_descriptor(data)
    assert (d.format, d.root, d.names, d.train, d.val) == ("yolo", str(darknet), ("ant", "bee"),
                                                          ("data/train.txt",), None)
    records = load_split(d, "train", cache=False)
    np.testing.assert_allclose(records[0].boxes, [[5, 2.5, 15, 7.5]])
    np.testing.assert_array_equal(records[0].labels, [1])
    write(data, f"valid = {darknet / 'data' / 'train.txt'}\nnames = data/obj.names\n")   # absolute list
    d = load_descriptor(data)
    assert (d.root, d.train, d.val) == (str(darknet), None, (str(darknet / "data" / "train.txt"),))
    assert [r.image_id for r in load_split(d, "val", cache=False)] == ["p"]
    write(data, "classes = 3\ntrain = data/train.txt\nnames = data/obj.names\n")
    with pytest.raises(YoloCompressError, match="classes=3 but .*obj.names has 2 names"):
        load_descriptor(data)


# ----------------------------------------------------------------------------- loading and caching

def _cache_files(root):
    return glob.glob(os.path.join(root, ".yolocompress-cache", "*.npz"))


def _no_parsing(monkeypatch):
    def fail(*args):
        raise AssertionError("parsed although the cache is current")
    monkeypatch.setattr("yolocompress.data.formats._parse_voc_xml", fail)
    monkeypatch.setattr("yolocompress.data.formats.image_size", fail)


def test_second_load_comes_from_the_cache_without_parsing(voc_set, monkeypatch):
    first = load_split(voc_set, "train")
    assert len(_cache_files(voc_set.root)) == 1
    with np.load(_cache_files(voc_set.root)[0], allow_pickle=False) as z:   # plain arrays only
        assert all(z[k].dtype.kind != "O" for k in z.files)
    _no_parsing(monkeypatch)
    second = load_split(voc_set, "train")
    assert [(r.image, r.image_id, r.width, r.height) for r in second] == \
        [(r.image, r.image_id, r.width, r.height) for r in first]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.difficult, b.difficult)
    np.testing.assert_array_equal(second[0].boxes, [[0, 0, 10, 10], [1, 1, 32, 20]])
    np.testing.assert_array_equal(second[0].difficult, [False, True])


def test_cache_inside_an_image_folder_root_still_hits(tmp_path, monkeypatch):
    # images directly in root: creating root/.yolocompress-cache changes root's mtime, an input
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((6, 8, 3), np.uint8))
    d = descriptor(tmp_path, "format: yolo\nroot: .\ntrain: .\nnames: [n]\n")
    assert [(r.width, r.height) for r in load_split(d, "train")] == [(8, 6)]
    _no_parsing(monkeypatch)
    assert [(r.width, r.height) for r in load_split(d, "train")] == [(8, 6)]


def test_changed_annotation_invalidates_the_cache(voc_set):
    load_split(voc_set, "train")
    xml = Path(voc_set.root) / "VOC2007" / "Annotations" / "b.xml"
    text = xml.read_text().replace("<xmin>3</xmin>", "<xmin>2</xmin>")   # same size: mtime must tell
    stat = xml.stat()
    xml.write_text(text)
    os.utime(xml, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    np.testing.assert_array_equal(load_split(voc_set, "train")[1].boxes, [[1, 3, 5, 6]])
    assert len(_cache_files(voc_set.root)) == 1                           # rewritten in place


def test_corrupt_cache_is_rebuilt_silently(voc_set, caplog):
    load_split(voc_set, "train")
    path = _cache_files(voc_set.root)[0]
    Path(path).write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.INFO, logger="yolocompress.data"):
        records = load_split(voc_set, "train")
    assert len(records) == 2 and not caplog.records
    assert cache_mod.load_records(path, "wrong fingerprint") is None      # a valid file again, other key


def test_cache_location_override_and_read_only_fallback(voc_set, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOCOMPRESS_CACHE", str(tmp_path / "override"))
    load_split(voc_set, "train")
    assert len(glob.glob(str(tmp_path / "override" / "*.npz"))) == 1 and not _cache_files(voc_set.root)
    monkeypatch.delenv("YOLOCOMPRESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache_mod, "_writable", lambda folder: False)
    load_split(voc_set, "train")
    assert len(glob.glob(str(tmp_path / "xdg" / "yolocompress" / "*.npz"))) == 1


def test_one_summary_per_load_and_strict_mode_also_from_the_cache(tmp_path, caplog):
    root = tmp_path / "VOCdevkit"
    make_voc(root, {"a": [("cat", 1, 1, 10, 10, 0), ("yak", 1, 1, 5, 5, 0)], "b": []})
    d = descriptor(tmp_path, "format: voc\nroot: VOCdevkit\nval: 2007/trainval\nnames: [cat]\n")
    for _ in range(2):                                  # cold, then from the cache
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="yolocompress.data"):
            records, issues = load_split_with_issues(d, "val")
        assert len(records) == 2 and issues.counts == {"unknown_class": 1, "empty": 1}
        assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
        assert "unknown_class x1" in caplog.text and "yak" in caplog.text
    for cache in (True, False):
        with pytest.raises(YoloCompressError, match=r"Annotations.a\.xml.*class not in names"):
            load_split(d, "val", cache=cache, strict=True)


def test_a_split_without_usable_images_is_an_error(tmp_path):
    root = tmp_path / "VOCdevkit"
    make_voc(root, {"a": []})
    (root / "VOC2007" / "JPEGImages" / "a.jpg").unlink()
    d = descriptor(tmp_path, "format: voc\nroot: VOCdevkit\ntrain: 2007/trainval\nnames: [cat]\n")
    with pytest.raises(YoloCompressError, match=r"no usable images in split 'train'.*missing_image"):
        load_split(d, "train")
