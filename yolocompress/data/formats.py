"""Data-set readers: PASCAL VOC (devkit and flat layouts), COCO JSON and Darknet YOLO txt -> list[Record].

Box convention, one for every format: continuous pixel-edge xyxy in the original image, so a box
covering a W x H image is [0, 0, W, H]. VOC XML holds 1-based inclusive pixel indices; its
(xmin, ymin, xmax, ymax) becomes (xmin - 1, ymin - 1, xmax, ymax) here, keeping the devkit's width
xmax - xmin + 1. So IoU *without* the +1 on Records equals the devkit's +1 IoU on the XML numbers:
evaluate Records with `plus_one=False`. COCO xywh and YOLO normalised boxes are continuous already.

The image file is the truth for size and readability: every image's header is read (PNG, JPEG, BMP,
GIF parsed here, in stored orientation, EXIF ignored as Darknet does; other formats through cv2).
Bad data is reported to a `DataIssues` and skipped, never raised (unless the report is strict);
so are list entries and COCO file names that lead outside the data root (a lexical check: symlinked
folders inside root are fine). A broken split *definition* (missing list file, unreadable COCO
JSON) is a `YoloCompressError`.
"""
from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from yolocompress.data.imagesize import image_size
from yolocompress.data.issues import DataIssues
from yolocompress.data.records import Record
from yolocompress.errors import YoloCompressError

__all__ = ["FORMATS", "READER_VERSION", "IMAGE_EXTS", "image_size", "label_path",
           "normalize_entries", "read_split", "split_inputs"]

FORMATS = ("voc", "voc-flat", "coco", "yolo")
READER_VERSION = 1            # bump when a reader's output changes: invalidates annotation caches
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_FLAT_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp")  # voc-flat image lookup order
_CLIP_TOL = 0.5               # overshoot (px) below this is rounding: clipped without a report
_VOC_ENTRY = re.compile(r"^(?:VOC)?([\w.-]+)/([\w.-]+)$")


# ----------------------------------------------------------------------------- shared helpers

@dataclass(frozen=True)
class _Item:
    """One image to read: its annotation (or label) file and candidate image paths, first existing wins."""
    annotation: str
    images: tuple[str, ...]


class _Classes:
    """Class name -> index in `names`, through `aliases`, then case-insensitively if unambiguous."""

    def __init__(self, names: Sequence[str], aliases: Mapping[str, str] | None):
        self.names = tuple(names)
        self._index = {n: i for i, n in enumerate(self.names)}
        for alias, target in (aliases or {}).items():
            if target not in self._index:
                raise YoloCompressError(f"alias {alias!r} -> {target!r}: {target!r} is not in names")
            self._index.setdefault(alias, self._index[target])
        folded: dict[str, set[int]] = defaultdict(set)
        for key, i in self._index.items():
            folded[key.casefold()].add(i)
        self._folded = {k: next(iter(v)) for k, v in folded.items() if len(v) == 1}

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, name: str) -> int | None:
        name = name.strip()
        i = self._index.get(name)
        return self._folded.get(name.casefold()) if i is None else i


def _inside(root: str, path: str) -> str | None:
    """`path` (relative to `root`, or absolute) normalised, or None if it leaves `root`.

    The check is lexical (no symlink resolution), so a data set may keep its images behind a symlink.
    """
    p = os.path.normpath(os.path.join(root, path))
    r = os.path.normpath(root)
    return p if os.path.commonpath([r, p]) == r else None


def _read_list(path: str) -> list[str]:
    """Non-blank, non-comment lines of a list file; a missing file is a split-definition error."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [ln.strip() for ln in f]
    except FileNotFoundError:
        raise YoloCompressError(f"{path}: list file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise YoloCompressError(f"{path}: cannot read list file ({e})") from e
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _first_existing(paths: Iterable[str]) -> str | None:
    return next((p for p in paths if os.path.isfile(p)), None)


def _unique(items: list, key: Callable[[Any], str], rel: Callable[[str], str],
            issues: DataIssues) -> list:
    seen: set[str] = set()
    out = []
    for item in items:
        k = key(item)
        if k in seen:
            issues.add("duplicate", rel(k))
            continue
        seen.add(k)
        out.append(item)
    return out


def _progress(items: Sequence, desc: str) -> Iterable:
    return tqdm(items, desc=desc, unit="img", disable=None, leave=False)


def _fmt_box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in box) + "]"


def _clip(box: Sequence[float], w: int, h: int, file: str, issues: DataIssues) -> list[float] | None:
    """Box clipped to the image; None (reported) if malformed or of zero area after clipping."""
    if not all(math.isfinite(v) for v in box):
        issues.add("malformed_object", file, f"box {_fmt_box(box)}")
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    c = [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)]
    if c[2] <= c[0] or c[3] <= c[1]:
        issues.add("degenerate", file, f"box {_fmt_box(box)} in {w}x{h}")
        return None
    if min(x1, y1) < -_CLIP_TOL or x2 > w + _CLIP_TOL or y2 > h + _CLIP_TOL:
        issues.add("clipped", file, f"box {_fmt_box(box)} in {w}x{h}")
    return c


def _make_record(image: str, w: int, h: int, objects: Iterable[tuple[int, Sequence[float], bool]],
                 file: str, issues: DataIssues) -> Record:
    boxes, labels, difficult = [], [], []
    for label, box, diff in objects:
        clipped = _clip(box, w, h, file, issues)
        if clipped is not None:
            boxes.append(clipped)
            labels.append(label)
            difficult.append(diff)
    if not boxes:
        issues.add("empty", file)
    return Record(image=image, width=w, height=h, boxes=boxes, labels=labels, difficult=difficult)


def _checked_size(image: str | None, expected: str, rel: Callable[[str], str],
                  issues: DataIssues) -> tuple[int, int] | None:
    """Size of an existing, readable image; None (reported) otherwise."""
    if image is None:
        issues.add("missing_image", rel(expected))
        return None
    size = image_size(image)
    if size is None:
        issues.add("unreadable_image", rel(image))
    return size


def _check_declared(declared: tuple[int, int], size: tuple[int, int], file: str, issues: DataIssues) -> None:
    if declared[0] > 0 and declared[1] > 0 and declared != size:
        issues.add("size_mismatch", file, f"annotated {declared[0]}x{declared[1]}, image {size[0]}x{size[1]}")


# ----------------------------------------------------------------------------- VOC XML (devkit and flat)

@dataclass
class _VocXml:
    width: int
    height: int
    objects: list[tuple[str, tuple[float, float, float, float] | None, bool]]


def _int_or_zero(text: str | None) -> int:
    try:
        return int(float(text)) if text else 0
    except ValueError:
        return 0


def _parse_voc_xml(path: str) -> _VocXml:
    """Size and (name, 1-based box or None if malformed, difficult) per object of a VOC XML file.

    A blank file is an annotation without objects. Raises ET.ParseError/OSError on a broken file.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        return _VocXml(0, 0, [])
    root = ET.fromstring(data)
    size = root.find("size")
    width = _int_or_zero(size.findtext("width")) if size is not None else 0
    height = _int_or_zero(size.findtext("height")) if size is not None else 0
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        bnd = obj.find("bndbox")
        try:
            box = tuple(float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):   # no bndbox, missing or non-numeric corner
            box = None
        difficult = _int_or_zero((obj.findtext("difficult") or "").strip()) != 0
        objects.append((name, box, difficult))
    return _VocXml(width, height, objects)


def _read_voc_items(items: list[_Item], classes: _Classes, issues: DataIssues,
                    rel: Callable[[str], str]) -> list[Record]:
    records = []
    for item in _progress(items, "VOC annotations"):
        file = rel(item.annotation)
        if not os.path.isfile(item.annotation):
            issues.add("missing_annotation", file)
            continue
        image = _first_existing(item.images)
        size = _checked_size(image, item.images[0], rel, issues)
        if size is None:
            continue
        try:
            xml = _parse_voc_xml(item.annotation)
        except (ET.ParseError, OSError) as e:
            issues.add("malformed_annotation", file, str(e))
            continue
        _check_declared((xml.width, xml.height), size, file, issues)
        objects = []
        for name, box, difficult in xml.objects:
            if box is None or not name:
                issues.add("malformed_object", file, f"object {name!r} without a numeric bndbox"
                           if name else "object without a name")
                continue
            label = classes(name)
            if label is None:
                issues.add("unknown_class", file, name)
                continue
            objects.append((label, (box[0] - 1.0, box[1] - 1.0, box[2], box[3]), difficult))
        records.append(_make_record(image, size[0], size[1], objects, file, issues))
    return records


def _voc_items(root: str, entries: Sequence[str], issues: DataIssues | None) -> tuple[list[str], list[_Item]]:
    """(list files, items) of VOCdevkit entries "YEAR/SET" -> root/VOC<YEAR>/ImageSets/Main/<SET>.txt."""
    lists, items = [], []
    for entry in entries:
        year, subset = _VOC_ENTRY.match(entry).groups()
        base = os.path.join(root, f"VOC{year}")
        listfile = os.path.join(base, "ImageSets", "Main", f"{subset}.txt")
        lists.append(listfile)
        for line in _read_list(listfile):
            image_id = line.split()[0]      # class lists hold "<id> <flag>"
            ann = _inside(root, os.path.join(base, "Annotations", f"{image_id}.xml"))
            img = _inside(root, os.path.join(base, "JPEGImages", f"{image_id}.jpg"))
            if ann is None or img is None:
                if issues is not None:
                    issues.add("outside_root", f"{os.path.relpath(listfile, root)}: {image_id}")
                continue
            items.append(_Item(ann, (img,)))
    return lists, items


def _flat_items(root: str, entries: Sequence[str], issues: DataIssues | None) -> tuple[list[str], list[_Item]]:
    """(list files, items) of a flat VOC layout: root/annotations/<id>.xml, root/images/<id>.<ext>.

    List lines may be ids, file names, or paths inside root (`images/x.jpg`, absolute ones too).
    """
    lists, items = [], []
    for entry in entries:
        listfile = os.path.join(root, entry)
        lists.append(listfile)
        for line in _read_list(listfile):
            token = line.replace("\\", "/")
            base = os.path.basename(token)
            stem, ext = os.path.splitext(base)
            if ext.lower() not in IMAGE_EXTS + (".xml",):
                stem, ext = base, ""
            given = None
            if "/" in token or os.path.isabs(token):
                path = _inside(root, token)
                if path is None:
                    if issues is not None:
                        issues.add("outside_root", f"{entry}: {line}")
                    continue
                if ext.lower() in IMAGE_EXTS:
                    given = path
            elif ext.lower() in IMAGE_EXTS:
                given = os.path.join(root, "images", base)
            candidates = [given] if given else []
            candidates += [p for p in (os.path.join(root, "images", stem + e) for e in _FLAT_EXTS)
                           if p not in candidates]
            items.append(_Item(os.path.join(root, "annotations", stem + ".xml"), tuple(candidates)))
    return lists, items


def _read_voc(root: str, entries: Sequence[str], classes: _Classes, issues: DataIssues,
              rel: Callable[[str], str]) -> list[Record]:
    items = _unique(_voc_items(root, entries, issues)[1], lambda it: it.annotation, rel, issues)
    return _read_voc_items(items, classes, issues, rel)


def _read_flat(root: str, entries: Sequence[str], classes: _Classes, issues: DataIssues,
               rel: Callable[[str], str]) -> list[Record]:
    items = _unique(_flat_items(root, entries, issues)[1], lambda it: it.annotation, rel, issues)
    return _read_voc_items(items, classes, issues, rel)


# ----------------------------------------------------------------------------- YOLO (Darknet) txt

def label_path(image: str, root: str) -> str:
    """Darknet's label file of an image: the last `images`/`JPEGImages` folder below root -> `labels`, ext -> .txt."""
    rel = os.path.relpath(image, root).split(os.sep)
    for i in range(len(rel) - 2, -1, -1):
        if rel[i] in ("images", "JPEGImages"):
            rel[i] = "labels"
            break
    return os.path.splitext(os.path.join(root, *rel))[0] + ".txt"


def _yolo_items(root: str, entries: Sequence[str], issues: DataIssues | None) -> tuple[list[str], list[_Item]]:
    """(list files, items) of YOLO entries: a list file of image paths, or a folder searched for images."""
    lists, items = [], []
    for entry in entries:
        source = os.path.join(root, entry)
        if os.path.isdir(source):
            lines = []
            for folder, subdirs, files in os.walk(source):
                subdirs[:] = [s for s in subdirs if not s.startswith(".")]   # e.g. the annotation cache
                lines += [os.path.join(folder, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
            lines.sort()
        else:
            lists.append(source)
            lines = [ln.replace("\\", "/") for ln in _read_list(source)]
        for line in lines:
            image = _inside(root, line)
            if image is None:
                if issues is not None:
                    issues.add("outside_root", f"{entry}: {line}")
                continue
            items.append(_Item(label_path(image, root), (image,)))
    return lists, items


def _parse_yolo_line(line: str) -> tuple[int, tuple[float, float, float, float]]:
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"{len(fields)} fields, expected 'class cx cy w h'")
    cls = float(fields[0])
    if not cls.is_integer():
        raise ValueError(f"class {fields[0]!r} is not an integer")
    cx, cy, w, h = (float(v) for v in fields[1:])
    return int(cls), (cx, cy, w, h)


def _read_yolo(root: str, entries: Sequence[str], classes: _Classes, issues: DataIssues,
               rel: Callable[[str], str]) -> list[Record]:
    items = _unique(_yolo_items(root, entries, issues)[1], lambda it: it.images[0], rel, issues)
    records = []
    for item in _progress(items, "YOLO labels"):
        image = item.images[0]
        size = _checked_size(image if os.path.isfile(image) else None, image, rel, issues)
        if size is None:
            continue
        w, h = size
        file = rel(item.annotation)
        try:
            with open(item.annotation, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            issues.add("missing_label", file)
            lines = []
        except (OSError, UnicodeDecodeError) as e:
            issues.add("malformed_annotation", file, str(e))
            continue
        objects = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                cls, (cx, cy, bw, bh) = _parse_yolo_line(line)
            except ValueError as e:
                issues.add("malformed_object", f"{file}:{lineno}", str(e))
                continue
            if not 0 <= cls < len(classes):
                issues.add("unknown_class", f"{file}:{lineno}", f"class {cls} of {len(classes)}")
                continue
            box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
            objects.append((cls, box, False))
        records.append(_make_record(image, w, h, objects, file, issues))
    return records


# ----------------------------------------------------------------------------- COCO JSON

def _load_coco(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise YoloCompressError(f"{path}: COCO annotation file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise YoloCompressError(f"{path}: not a readable COCO annotation file ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise YoloCompressError(f"{path}: not a COCO annotation file "
                                "(expected an object with lists 'images', 'categories', 'annotations')")
    return data


def _id(value: Any) -> int | str | None:
    """A COCO id usable as a key (int or str), else None."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _coco_box(ann: Any) -> tuple[float, float, float, float] | None:
    bbox = ann.get("bbox") if isinstance(ann, dict) else None
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    return x, y, x + w, y + h


def _read_coco(root: str, entries: Sequence[tuple[str, str]], classes: _Classes, issues: DataIssues,
               rel: Callable[[str], str]) -> list[Record]:
    items = []   # (image path, file for reports, declared size, annotations)
    for ann_rel, img_rel in entries:
        ann_path, img_dir = os.path.join(root, ann_rel), os.path.join(root, img_rel)
        data = _load_coco(ann_path)
        src = rel(ann_path)
        category = {_id(c.get("id")): (c.get("name", ""), classes(str(c.get("name", ""))))
                    for c in data["categories"] if isinstance(c, dict) and _id(c.get("id")) is not None}
        by_image: dict[Any, list] = defaultdict(list)
        for ann in data.get("annotations", []):
            by_image[_id(ann.get("image_id")) if isinstance(ann, dict) else None].append(ann)
        known = set()
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict) or _id(img.get("id")) is None \
                    or not isinstance(img.get("file_name"), str):
                issues.add("malformed_annotation", f"{src}: images[{k}]", "needs 'id' and 'file_name'")
                continue
            known.add(img["id"])
            path = _inside(img_dir, img["file_name"])
            if path is None:
                issues.add("outside_root", f"{src}: {img['file_name']}")
                continue
            declared = (_int_or_zero(str(img.get("width", 0))), _int_or_zero(str(img.get("height", 0))))
            items.append((path, f"{src}: {img['file_name']}", declared, by_image.get(img["id"], [])))
        for image_id, anns in by_image.items():
            if image_id not in known:
                issues.add("malformed_object", src, f"{len(anns)} annotation(s) of unknown image_id {image_id!r}")

    records = []
    for path, file, declared, anns in _progress(_unique(items, lambda it: it[0], rel, issues), "COCO images"):
        size = _checked_size(path if os.path.isfile(path) else None, path, rel, issues)
        if size is None:
            continue
        _check_declared(declared, size, file, issues)
        objects = []
        for ann in anns:
            box = _coco_box(ann)
            if box is None or _id(ann.get("category_id")) not in category:
                issues.add("malformed_object", file, f"annotation id {ann.get('id')!r}: bad bbox or category_id")
                continue
            name, label = category[_id(ann["category_id"])]
            if label is None:
                issues.add("unknown_class", file, str(name))
                continue
            objects.append((label, box, bool(ann.get("iscrowd", 0))))
        records.append(_make_record(path, size[0], size[1], objects, file, issues))
    return records


# ----------------------------------------------------------------------------- dispatch

_READERS = {"voc": _read_voc, "voc-flat": _read_flat, "coco": _read_coco, "yolo": _read_yolo}
_LISTERS = {"voc": _voc_items, "voc-flat": _flat_items, "yolo": _yolo_items}


def normalize_entries(fmt: str, value: Any, where: str) -> tuple:
    """A split's value checked for `fmt`: a tuple of str (voc, voc-flat, yolo) or (json, image dir) pairs (coco).

    voc: "YEAR/SET" (VOCdevkit/VOC<YEAR>/ImageSets/Main/<SET>.txt); voc-flat, yolo: list files (yolo:
    or image folders) relative to root; coco: {annotations: <json>, images: <folder>}. A single value or
    a list, combined in order.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise YoloCompressError(f"{where}: empty split")
    out = []
    for v in values:
        if fmt == "coco" and isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, str) for x in v):
            out.append(v)                          # already normalised
        elif fmt == "coco":
            if not isinstance(v, dict) or set(v) != {"annotations", "images"} \
                    or not all(isinstance(x, str) and x for x in v.values()):
                raise YoloCompressError(f"{where}: a coco split is {{annotations: <json file>, images: <folder>}},"
                                        f" got {v!r}")
            out.append((v["annotations"], v["images"]))
        elif not isinstance(v, str) or not v:
            raise YoloCompressError(f"{where}: expected a non-empty string, got {v!r}")
        elif fmt == "voc" and not _VOC_ENTRY.match(v):
            raise YoloCompressError(f"{where}: VOC split entry {v!r} is not YEAR/SET (like 2007/trainval)")
        else:
            out.append(v)
    return tuple(out)


def read_split(fmt: str, root: str, entries: Sequence, names: Sequence[str],
               aliases: Mapping[str, str] | None = None, issues: DataIssues | None = None) -> list[Record]:
    """Records of one split (entries as `normalize_entries` takes them), in entry and list order.

    Problems go to `issues` (a fresh non-strict report if None). `image_id` is the file stem, or the
    path relative to root where stems clash.
    """
    if fmt not in _READERS:
        raise YoloCompressError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    root = os.path.abspath(root)
    entries = normalize_entries(fmt, entries, f"{fmt} split")
    issues = DataIssues(f"{fmt} {root}") if issues is None else issues

    def rel(path: str) -> str:
        inside = _inside(root, path)
        return os.path.relpath(inside, root) if inside else path

    records = _READERS[fmt](root, entries, _Classes(names, aliases), issues, rel)
    stems = Counter(r.image_id for r in records)
    for r in records:
        if stems[r.image_id] > 1:
            r.image_id = os.path.relpath(r.image, root).replace(os.sep, "/")
    return records


def split_inputs(fmt: str, root: str, entries: Sequence) -> list[str]:
    """Files and folders whose state determines `read_split`'s result, found without parsing any of them.

    For coco that is the JSON and the image folder (whose mtime changes when images come or go); for
    the list formats the list files, every annotation/label file and every candidate image up to the
    first existing one, plus the image folders.
    """
    if fmt not in _READERS:
        raise YoloCompressError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    root = os.path.abspath(root)
    entries = normalize_entries(fmt, entries, f"{fmt} split")
    if fmt == "coco":
        return [os.path.join(root, p) for pair in entries for p in pair]
    lists, items = _LISTERS[fmt](root, entries, None)
    paths = list(lists)
    folders = set()
    for item in items:
        paths.append(item.annotation)
        for image in item.images:
            paths.append(image)
            folders.add(os.path.dirname(image))
            if os.path.isfile(image):
                break
    return paths + sorted(folders)
