"""Readers of yolocompress.data.formats on miniature data sets written here: exact boxes, labels,
difficult flags, sizes and ids per layout; every bad-data kind counted; strict mode; path escapes."""
from __future__ import annotations

import json
import os
import struct

import cv2
import numpy as np
import pytest

from yolocompress.data.formats import image_size, label_path, normalize_entries, read_split, split_inputs
from yolocompress.data.issues import ISSUE_KINDS, DataIssues
from yolocompress.data.records import pairwise_iou
from yolocompress.errors import YoloCompressError

VOC_NAMES = ["cat", "dog", "person"]


def write_image(path, width, height, ext_params=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 127, np.uint8), list(ext_params))


def voc_xml(objects, size=None):
    """VOC XML text; objects are (name, (xmin, ymin, xmax, ymax) 1-based, difficult or None)."""
    parts = ["<annotation><filename>x.jpg</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        parts.append(f"<object><name>{name}</name>")
        if difficult is not None:
            parts.append(f"<difficult>{difficult}</difficult>")
        parts.append("<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
                     + "</bndbox></object>")
    return "".join(parts) + "</annotation>"


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_devkit_year(root, year, subset, samples):
    """samples: id -> (width, height, objects)."""
    base = os.path.join(root, f"VOC{year}")
    for image_id, (w, h, objects) in samples.items():
        write_image(os.path.join(base, "JPEGImages", f"{image_id}.jpg"), w, h)
        write(os.path.join(base, "Annotations", f"{image_id}.xml"), voc_xml(objects, (w, h)))
    write(os.path.join(base, "ImageSets", "Main", f"{subset}.txt"), "".join(f"{i}\n" for i in samples))


# ----------------------------------------------------------------------------- image headers

def test_image_size_reads_headers_of_each_format(tmp_path):
    for ext, params in [(".jpg", ()), (".png", ()), (".bmp", ()),
                        (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))]:
        path = tmp_path / f"a{len(params)}{ext}"
        write_image(path, 41, 23, params)
        assert image_size(str(path)) == (41, 23), path

    # an APP1 (EXIF-like) segment and fill bytes before the frame header must be skipped
    jpg = (tmp_path / "a0.jpg").read_bytes()
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 300) + b"Exif\0\0" + bytes(294)
    (tmp_path / "exif.jpg").write_bytes(jpg[:2] + app1 + b"\xff" + jpg[2:])
    assert image_size(str(tmp_path / "exif.jpg")) == (41, 23)

    (tmp_path / "g.gif").write_bytes(b"GIF89a" + struct.pack("<HH", 7, 5) + bytes(20))
    assert image_size(str(tmp_path / "g.gif")) == (7, 5)
    # a top-down BMP has a negative height
    bmp = bytearray((tmp_path / "a0.bmp").read_bytes())
    bmp[22:26] = struct.pack("<i", -23)
    (tmp_path / "td.bmp").write_bytes(bytes(bmp))
    assert image_size(str(tmp_path / "td.bmp")) == (41, 23)


def test_image_size_falls_back_to_cv2_and_reports_unreadable(tmp_path, monkeypatch):
    write_image(tmp_path / "a.tiff", 12, 9)
    assert image_size(str(tmp_path / "a.tiff")) == (12, 9)          # no header parser: cv2 decodes
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8" + b"\x00" * 50)  # JPEG magic, no frame header
    assert image_size(str(tmp_path / "junk.jpg")) is None
    (tmp_path / "text.png").write_text("not an image")
    assert image_size(str(tmp_path / "text.png")) is None
    assert image_size(str(tmp_path / "absent.jpg")) is None


# ----------------------------------------------------------------------------- VOC devkit

def test_voc_devkit_years_combine_in_order_with_exact_boxes(tmp_path):
    root = str(tmp_path / "VOCdevkit")
    make_devkit_year(root, "2007", "trainval", {
        "000005": (40, 30, [("dog", (1, 1, 40, 30), None), ("cat", (5, 6, 10, 12), 1)]),
        "000007": (20, 10, [("person", (2.5, 3, 8, 9), 0)]),
    })
    make_devkit_year(root, "2012", "trainval", {"2008_000001": (16, 16, [("cat", (1, 2, 3, 4), None)])})
    issues = DataIssues("voc")
    records = read_split("voc", root, ["2007/trainval", "VOC2012/trainval"], VOC_NAMES, issues=issues)

    assert [r.image_id for r in records] == ["000005", "000007", "2008_000001"]
    assert records[0].image == os.path.join(root, "VOC2007", "JPEGImages", "000005.jpg")
    assert (records[0].width, records[0].height) == (40, 30)
    # 1-based inclusive (xmin, ymin, xmax, ymax) -> continuous (xmin - 1, ymin - 1, xmax, ymax)
    np.testing.assert_array_equal(records[0].boxes, [[0, 0, 40, 30], [4, 5, 10, 12]])
    np.testing.assert_array_equal(records[0].labels, [1, 0])
    np.testing.assert_array_equal(records[0].difficult, [False, True])
    np.testing.assert_array_equal(records[1].boxes, [[1.5, 2, 8, 9]])
    np.testing.assert_array_equal(records[1].labels, [2])
    np.testing.assert_array_equal(records[2].boxes, [[0, 1, 3, 4]])
    assert records[2].image.endswith(os.path.join("VOC2012", "JPEGImages", "2008_000001.jpg"))
    assert issues.counts == {}

    # the documented consequence: IoU without +1 on Records == the devkit's +1 IoU on XML numbers
    xml_gt = np.array([[1, 1, 40, 30], [5, 6, 10, 12]], np.float64)
    xml_det = np.array([[6, 7, 11, 12], [1, 1, 39, 29], [5, 6, 5, 6]], np.float64)
    det = xml_det - [1, 1, 0, 0]
    np.testing.assert_allclose(pairwise_iou(records[0].boxes, det), pairwise_iou(xml_gt, xml_det, plus_one=True))


def test_voc_entry_syntax_and_missing_list_file(tmp_path):
    with pytest.raises(YoloCompressError, match="YEAR/SET"):
        normalize_entries("voc", ["2007"], "voc.yaml: train")
    with pytest.raises(YoloCompressError, match=r"ImageSets.Main.trainval\.txt: list file not found"):
        read_split("voc", str(tmp_path), ["2007/trainval"], VOC_NAMES)


# ----------------------------------------------------------------------------- VOC flat (wildlife)

WILDLIFE = ["giraffe", "person", "zebra", "elephant", "impala", "monkey", "lion", "leopard",
            "crocodile", "buffalo", "hyena", "bird", "gorilla"]


def test_voc_flat_accepts_ids_names_and_paths_and_the_hyna_alias(tmp_path):
    root = tmp_path / "wild"
    for stem, ext in [("a", ".jpg"), ("b", ".jpg"), ("c", ".png"), ("d", ".jpg")]:
        write_image(root / "images" / f"{stem}{ext}", 30, 20)
    write(root / "annotations" / "a.xml", voc_xml([("zebra", (1, 1, 10, 10), None)], (30, 20)))
    write(root / "annotations" / "b.xml", voc_xml([("hyna", (2, 3, 4, 5), None)], (30, 20)))
    write(root / "annotations" / "c.xml", voc_xml([("Hyena", (1, 1, 30, 20), 1)], (30, 20)))
    write(root / "annotations" / "d.xml", voc_xml([("gorilla", (3, 3, 6, 6), None)], (30, 20)))
    (tmp_path / "outside.jpg").write_bytes(b"")
    write(root / "train.txt", f"a\nb.jpg\n\n# comment\nimages/c.png\n{root / 'images' / 'd.jpg'}\n"
                              "../outside.jpg\nimages/../../outside\n")
    issues = DataIssues("wildlife")
    records = read_split("voc-flat", str(root), "train.txt", WILDLIFE, {"hyna": "hyena"}, issues)

    assert [r.image_id for r in records] == ["a", "b", "c", "d"]
    assert records[2].image == str(root / "images" / "c.png")
    assert [r.labels.tolist() for r in records] == [[2], [10], [10], [12]]
    np.testing.assert_array_equal(records[1].boxes, [[1, 2, 4, 5]])
    np.testing.assert_array_equal(records[2].difficult, [True])
    assert issues.counts == {"outside_root": 2}
    assert issues.examples["outside_root"] == ["train.txt: ../outside.jpg", "train.txt: images/../../outside"]


# ----------------------------------------------------------------------------- COCO

def test_coco_maps_categories_by_name_and_converts_boxes(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "val" / "1.jpg", 50, 40)
    write_image(root / "val" / "sub" / "2.jpg", 20, 20)
    (tmp_path / "escape.jpg").write_bytes(b"")
    data = {
        "images": [{"id": 10, "file_name": "1.jpg", "width": 50, "height": 40},
                   {"id": 11, "file_name": "sub/2.jpg", "width": 20, "height": 20},
                   {"id": 12, "file_name": "../../escape.jpg", "width": 5, "height": 5},
                   {"id": 13, "file_name": "gone.jpg", "width": 5, "height": 5}],
        "categories": [{"id": 5, "name": "person"}, {"id": 9, "name": "cat"}, {"id": 11, "name": "zebra"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 9, "bbox": [1.5, 2, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 5, "bbox": [0, 0, 50, 40], "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 11, "bbox": [1, 1, 2, 2], "iscrowd": 0},
            {"id": 4, "image_id": 99, "category_id": 5, "bbox": [1, 1, 2, 2], "iscrowd": 0},
            {"id": 5, "image_id": 11, "category_id": 5, "bbox": [1, 1], "iscrowd": 0},
        ],
    }
    write(root / "annotations" / "val.json", json.dumps(data))
    issues = DataIssues("coco")
    records = read_split("coco", str(root), {"annotations": "annotations/val.json", "images": "val"},
                         VOC_NAMES, issues=issues)

    assert [r.image_id for r in records] == ["1", "2"]
    np.testing.assert_array_equal(records[0].boxes, [[1.5, 2, 11.5, 22], [0, 0, 50, 40]])
    np.testing.assert_array_equal(records[0].labels, [0, 2])
    np.testing.assert_array_equal(records[0].difficult, [False, True])   # iscrowd -> difficult
    assert len(records[1]) == 0
    assert issues.counts == {"unknown_class": 1, "malformed_object": 2, "outside_root": 1,
                             "missing_image": 1, "empty": 1}
    assert issues.examples["outside_root"] == [os.path.join("annotations", "val.json") + ": ../../escape.jpg"]


def test_coco_unreadable_json_is_an_error_naming_the_file(tmp_path):
    write(tmp_path / "bad.json", "{not json")
    with pytest.raises(YoloCompressError, match=r"bad\.json: not a readable COCO annotation file"):
        read_split("coco", str(tmp_path), [{"annotations": "bad.json", "images": "."}], VOC_NAMES)
    write(tmp_path / "list.json", "[]")
    with pytest.raises(YoloCompressError, match=r"list\.json: not a COCO annotation file"):
        read_split("coco", str(tmp_path), [{"annotations": "list.json", "images": "."}], VOC_NAMES)
    with pytest.raises(YoloCompressError, match="a coco split is"):
        normalize_entries("coco", "instances.json", "coco.yaml: val")


# ----------------------------------------------------------------------------- YOLO txt

def test_yolo_label_path_follows_darknet():
    root = os.path.join(os.sep, "d", "images")          # an `images` folder above root is left alone
    assert label_path(os.path.join(root, "images", "train", "x.jpg"), root) == \
        os.path.join(root, "labels", "train", "x.txt")
    assert label_path(os.path.join(root, "VOC2007", "JPEGImages", "x.png"), root) == \
        os.path.join(root, "VOC2007", "labels", "x.txt")
    assert label_path(os.path.join(root, "pics", "x.jpeg"), root) == os.path.join(root, "pics", "x.txt")


def test_yolo_reader_denormalises_and_keeps_unlabelled_images(tmp_path):
    root = tmp_path / "yolo"
    write_image(root / "images" / "a.jpg", 100, 50)
    write_image(root / "images" / "b.png", 10, 10)
    write_image(root / "images" / "c.jpg", 10, 10)
    write(root / "labels" / "a.txt", "1 0.5 0.5 0.2 0.4\n\n0 0.05 0.1 0.2 0.2\n")
    write(root / "labels" / "b.txt", "")
    write(root / "list.txt", f"images/a.jpg\n{root / 'images' / 'b.png'}\nimages\\c.jpg\n/etc/passwd\n")
    issues = DataIssues("yolo")
    records = read_split("yolo", str(root), "list.txt", VOC_NAMES, issues=issues)

    assert [r.image_id for r in records] == ["a", "b", "c"]
    np.testing.assert_allclose(records[0].boxes, [[40, 15, 60, 35], [0, 0, 15, 10]], atol=1e-5)
    np.testing.assert_array_equal(records[0].labels, [1, 0])
    np.testing.assert_array_equal(records[0].difficult, [False, False])
    assert len(records[1]) == 0 and len(records[2]) == 0
    # b: empty label file; c: no label file (Darknet: image without objects); the second box of a (x from -5 px) clipped
    assert issues.counts == {"outside_root": 1, "missing_label": 1, "clipped": 1, "empty": 2}

    by_folder = read_split("yolo", str(root), "images", VOC_NAMES)        # a folder entry: sorted images
    assert [r.image_id for r in by_folder] == ["a", "b", "c"]


def test_clashing_stems_get_relative_path_ids(tmp_path):
    root = tmp_path / "yolo"
    for folder in ("x", "y"):
        write_image(root / "images" / folder / "same.jpg", 8, 8)
    write_image(root / "images" / "x" / "other.jpg", 8, 8)
    records = read_split("yolo", str(root), "images", VOC_NAMES)
    assert [r.image_id for r in records] == ["other", "images/x/same.jpg", "images/y/same.jpg"]


# ----------------------------------------------------------------------------- bad data

@pytest.fixture
def bad_flat(tmp_path):
    """A flat VOC set with one instance of every problem kind; returns (root, expected counts)."""
    root = tmp_path / "bad"
    ok_objects = [("zebra", (1, 1, 10, 10), None)]
    write_image(root / "images" / "good.jpg", 30, 20)
    write(root / "annotations" / "good.xml", voc_xml(ok_objects, (30, 20)))
    write(root / "annotations" / "noimage.xml", voc_xml(ok_objects, (30, 20)))
    (root / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00")
    write(root / "annotations" / "corrupt.xml", voc_xml(ok_objects, (30, 20)))
    write_image(root / "images" / "noxml.jpg", 30, 20)
    write_image(root / "images" / "broken.jpg", 30, 20)
    write(root / "annotations" / "broken.xml", "<annotation><object>")
    write_image(root / "images" / "mixed.jpg", 30, 20)
    write(root / "annotations" / "mixed.xml", voc_xml([
        ("unicorn", (1, 1, 5, 5), None),          # unknown class
        ("zebra", (-5, 2, 40, 10), None),         # clipped to [0, 1, 30, 10]
        ("zebra", (35, 2, 40, 10), None),         # entirely right of the image: degenerate
        ("zebra", (6, 2, 5, 10), None),           # xmax < xmin - 1: degenerate
        ("zebra", (1, 1, "wide", 5), None),       # malformed corner
        ("hyena", (1, 1, 2, 2), 1),
    ], (31, 20)))                                  # size disagrees with the image (30 x 20)
    write_image(root / "images" / "blank.jpg", 30, 20)
    write(root / "annotations" / "blank.xml", "")
    write_image(root / "images" / "none.jpg", 30, 20)
    write(root / "annotations" / "none.xml", voc_xml([], (30, 20)))
    write(root / "train.txt", "good\nnoimage\ncorrupt\nnoxml\nbroken\nmixed\nblank\nnone\ngood.jpg\n../up\n")
    expected = {"missing_image": 1, "unreadable_image": 1, "missing_annotation": 1, "malformed_annotation": 1,
                "unknown_class": 1, "clipped": 1, "degenerate": 2, "malformed_object": 1, "size_mismatch": 1,
                "empty": 2, "duplicate": 1, "outside_root": 1}
    return root, expected


def test_every_bad_data_kind_is_counted_and_reported_once(bad_flat):
    root, expected = bad_flat
    issues = DataIssues("bad train", max_examples=1)
    records = read_split("voc-flat", str(root), "train.txt", WILDLIFE, issues=issues)

    assert [r.image_id for r in records] == ["good", "mixed", "blank", "none"]
    np.testing.assert_array_equal(records[1].boxes, [[0, 1, 30, 10], [0, 0, 2, 2]])
    np.testing.assert_array_equal(records[1].labels, [2, 10])
    np.testing.assert_array_equal(records[1].difficult, [False, True])
    assert (records[1].width, records[1].height) == (30, 20)            # the image file wins
    assert issues.counts == expected
    assert issues.problems == sum(expected.values()) - expected["empty"]

    summary = issues.summary()
    assert summary.splitlines()[0] == f"bad train: {issues.problems} data problem(s), 2 note(s)"
    assert len(summary.splitlines()) == 1 + len(expected)
    assert f"  degenerate x2: {ISSUE_KINDS['degenerate'][0]}: " + \
        os.path.join("annotations", "mixed.xml") + " (box [34, 1, 40, 10] in 30x20), ... 1 more" in summary
    assert "missing_image x1" in summary and os.path.join("images", "noimage.jpg") in summary
    assert "unreadable_image x1" in summary and os.path.join("images", "corrupt.jpg") in summary


def test_yolo_bad_lines_are_counted(tmp_path):
    root = tmp_path / "yolo"
    write_image(root / "images" / "a.jpg", 10, 10)
    write(root / "labels" / "a.txt", "0 0.5 0.5 0.2\n7 0.5 0.5 0.2 0.2\nx 0.5 0.5 0.2 0.2\n"
                                     "1.5 0.5 0.5 0.2 0.2\n2 0.5 0.5 0 0.2\n2.0 0.5 0.5 0.4 0.4\n")
    issues = DataIssues("yolo")
    records = read_split("yolo", str(root), "images", VOC_NAMES, issues=issues)
    np.testing.assert_allclose(records[0].boxes, [[3, 3, 7, 7]], atol=1e-6)
    np.testing.assert_array_equal(records[0].labels, [2])
    assert issues.counts == {"malformed_object": 3, "unknown_class": 1, "degenerate": 1}
    assert issues.examples["unknown_class"] == [os.path.join("labels", "a.txt") + ":2 (class 7 of 3)"]


def test_strict_mode_raises_on_the_first_problem_naming_the_file(bad_flat):
    root, _ = bad_flat
    # list entries are checked before any file is read, so the escaping entry comes first
    with pytest.raises(YoloCompressError, match=r"^train\.txt: \.\./up: entry points outside the data root"):
        read_split("voc-flat", str(root), "train.txt", WILDLIFE, issues=DataIssues(strict=True))
    write(root / "inside.txt", "good\nnoimage\n")
    with pytest.raises(YoloCompressError, match=r"^images.noimage\.jpg: image file missing, skipped"):
        read_split("voc-flat", str(root), "inside.txt", WILDLIFE, issues=DataIssues(strict=True))
    # notes are valid data: empty images alone never raise
    write(root / "only.txt", "good\nnone\n")
    strict = DataIssues(strict=True)
    assert len(read_split("voc-flat", str(root), "only.txt", WILDLIFE, issues=strict)) == 2
    assert strict.counts == {"empty": 1}


def test_split_inputs_list_every_file_without_parsing(tmp_path, monkeypatch):
    root = str(tmp_path / "VOCdevkit")
    make_devkit_year(root, "2007", "test", {"1": (8, 8, []), "2": (8, 8, [])})
    monkeypatch.setattr("yolocompress.data.formats._parse_voc_xml", None)
    monkeypatch.setattr("yolocompress.data.formats.image_size", None)
    year = os.path.join(root, "VOC2007")
    assert split_inputs("voc", root, "2007/test") == [
        os.path.join(year, "ImageSets", "Main", "test.txt"),
        os.path.join(year, "Annotations", "1.xml"), os.path.join(year, "JPEGImages", "1.jpg"),
        os.path.join(year, "Annotations", "2.xml"), os.path.join(year, "JPEGImages", "2.jpg"),
        os.path.join(year, "JPEGImages")]
