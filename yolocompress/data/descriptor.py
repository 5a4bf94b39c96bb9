"""Data-set descriptors (a small YAML file: format, root, splits, classes) and loading a split of one.

Keys, exactly: `format` (voc | voc-flat | coco | yolo), `root` (relative to the descriptor's folder,
or absolute; `~` and `$VARS` expanded), `train` / `val` / `test` (at least one; entries as
`formats.normalize_entries` describes), `names` (class names in label order) and optional `aliases`
(other spelling -> name). A Darknet `.data` file (`train=`, `valid=`, `names=`) loads as a yolo
descriptor. `load_split` reads through the annotation cache and logs one bad-data summary.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from yolocompress.data.cache import cache_dir, fingerprint, load_records, save_records
from yolocompress.data.formats import FORMATS, READER_VERSION, normalize_entries, read_split, split_inputs
from yolocompress.data.issues import DataIssues
from yolocompress.data.records import Record
from yolocompress.errors import YoloCompressError

__all__ = ["KEYS", "SPLITS", "DataDescriptor", "parse_descriptor", "load_descriptor",
           "load_split", "load_split_with_issues"]

KEYS = ("format", "root", "train", "val", "test", "names", "aliases", "generate")
GENERATORS = ("demo",)   # `generate: demo` builds the set into root on first use
SPLITS = ("train", "val", "test")
_WHERE_TO_GET = ("PASCAL VOC: run `bash scripts/get_voc.sh <folder>` and set root to <folder>/VOCdevkit; "
                 "the wildlife and other sets: see the README section 'Data sets'")


@dataclass
class DataDescriptor:
    format: str
    root: str                        # absolute
    names: tuple[str, ...]
    train: tuple | None = None       # normalised split entries, None when the split is absent
    val: tuple | None = None
    test: tuple | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    source: str = ""                 # the descriptor file, for messages
    generate: str | None = None      # a built-in generator that writes the set into root if absent

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.source))[0] if self.source else self.format

    def entries(self, split: str) -> tuple:
        """The entries of `split`; an error naming the splits there are if it is absent."""
        value = getattr(self, split) if split in SPLITS else None
        if value is None:
            have = ", ".join(s for s in SPLITS if getattr(self, s) is not None)
            raise YoloCompressError(f"{self.source or self.name}: no {split!r} split (it has: {have})")
        return value


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(choices)}"


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value \
            or not all(isinstance(n, str) and n.strip() == n and n for n in value):
        hint = ("; quote names YAML reads as other types (yes, no, on, off, numbers)"
                if isinstance(value, list) and not all(isinstance(n, str) for n in value) else "")
        raise YoloCompressError(f"{where}: 'names' must be a non-empty list of class names, got {value!r}{hint}")
    dup = sorted({n for n in value if value.count(n) > 1})
    if dup:
        raise YoloCompressError(f"{where}: class names repeated in 'names': {', '.join(dup)}")
    return tuple(value)


def _aliases(value: Any, names: tuple[str, ...], where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise YoloCompressError(f"{where}: 'aliases' must map spellings to class names, got {value!r}")
    for alias, target in value.items():
        if target not in names:
            raise YoloCompressError(f"{where}: alias {alias!r} -> {target!r}: {target!r} is not in names")
        if alias in names:
            raise YoloCompressError(f"{where}: alias {alias!r} is itself a class name")
    return dict(value)


def parse_descriptor(data: Any, base_dir: str, source: str = "") -> DataDescriptor:
    """A descriptor from its parsed YAML mapping; relative roots resolve against `base_dir`."""
    where = source or "data descriptor"
    if not isinstance(data, Mapping):
        raise YoloCompressError(f"{where}: a data descriptor is a mapping of {', '.join(KEYS)}")
    for key in data:
        if key not in KEYS:
            raise YoloCompressError(f"{where}: unknown key {key!r}{_suggest(str(key), KEYS)}")
    for key in ("format", "root", "names"):
        if key not in data:
            raise YoloCompressError(f"{where}: missing key {key!r}")
    fmt = data["format"]
    if fmt not in FORMATS:
        raise YoloCompressError(f"{where}: unknown format {fmt!r}{_suggest(str(fmt), FORMATS)}")
    if not isinstance(data["root"], str) or not data["root"]:
        raise YoloCompressError(f"{where}: 'root' must be a folder path, got {data['root']!r}")
    if not any(data.get(s) is not None for s in SPLITS):
        raise YoloCompressError(f"{where}: no split given; set at least one of {', '.join(SPLITS)}")
    names = _names(data["names"], where)
    generate = data.get("generate")
    if generate is not None and generate not in GENERATORS:
        raise YoloCompressError(f"{where}: unknown generator {generate!r}"
                                f"{_suggest(str(generate), GENERATORS)}")
    root = os.path.expandvars(os.path.expanduser(data["root"]))
    splits = {s: normalize_entries(fmt, data[s], f"{where}: {s}") if data.get(s) is not None else None
              for s in SPLITS}
    return DataDescriptor(format=fmt, root=os.path.abspath(os.path.join(base_dir, root)), names=names,
                          aliases=_aliases(data.get("aliases"), names, where), source=source,
                          generate=generate, **splits)


def _darknet_data(path: str) -> DataDescriptor:
    """A yolo descriptor from a Darknet .data file. Darknet resolves paths from its working directory,
    usually the parent of the .data file's folder: root is the first of (the folder, its parent, the
    working directory) holding the train/valid list; for an absolute list, the parent if it holds it."""
    pairs = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise YoloCompressError(f"{path}:{lineno}: expected 'key = value', got {line!r}")
            key, value = (s.strip() for s in line.split("=", 1))
            pairs[key] = value
    lists = {"train": pairs.get("train") or None, "val": pairs.get("valid") or None}
    if not any(lists.values()) or not pairs.get("names"):
        raise YoloCompressError(f"{path}: a Darknet .data file needs 'names' and 'train' or 'valid'")
    folder = os.path.dirname(os.path.abspath(path))
    bases = [folder, os.path.dirname(folder), os.getcwd()]
    first = next(v for v in lists.values() if v)
    if os.path.isabs(first):     # the widest of (parent, folder) holding it, so relative image paths work
        root = next((b for b in bases[1::-1] if os.path.commonpath([b, first]) == b), os.path.dirname(first))
    else:
        root = next((b for b in bases if os.path.isfile(os.path.join(b, first))), None)
        if root is None:
            raise YoloCompressError(f"{path}: list {first!r} not found in {', '.join(bases)}")
    names_file = next((os.path.join(b, pairs["names"]) for b in [root] + bases
                       if os.path.isfile(os.path.join(b, pairs["names"]))), None)
    if names_file is None:
        raise YoloCompressError(f"{path}: names file {pairs['names']!r} not found")
    with open(names_file, encoding="utf-8-sig") as f:
        names = [ln.strip() for ln in f if ln.strip()]
    if "classes" in pairs and pairs["classes"] != str(len(names)):
        raise YoloCompressError(f"{path}: classes={pairs['classes']} but {names_file} has {len(names)} names")
    return DataDescriptor(format="yolo", root=root, names=_names(names, names_file), source=path,
                          **{s: normalize_entries("yolo", v, f"{path}: {s}") if v else None
                             for s, v in lists.items()})


def load_descriptor(path: str | os.PathLike) -> DataDescriptor:
    """Read and check a descriptor YAML (or a Darknet .data file)."""
    path = os.fspath(path)
    try:
        if path.endswith(".data"):
            return _darknet_data(path)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise YoloCompressError(f"{path}: data descriptor not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise YoloCompressError(f"{path}: cannot read data descriptor ({' '.join(str(e).split())})") from e
    return parse_descriptor(data, os.path.dirname(os.path.abspath(path)), path)


def load_split_with_issues(desc: DataDescriptor, split: str, cache: bool = True,
                           strict: bool = False) -> tuple[list[Record], DataIssues]:
    """`load_split` that also returns the bad-data report."""
    entries = desc.entries(split)
    if desc.generate == "demo" and not os.path.exists(desc.root):
        from .synthetic import generate_demo   # atomic: an existing root is a complete set
        generate_demo(desc.root)
    if os.path.exists(desc.root) and not os.path.isdir(desc.root):
        raise YoloCompressError(f"{desc.source or desc.name}: data root {desc.root} is a file, not a folder")
    if not os.path.isdir(desc.root):
        raise YoloCompressError(f"{desc.source or desc.name}: data root {desc.root} does not exist; {_WHERE_TO_GET}")
    issues = DataIssues(f"{desc.name} {split}", strict=strict)
    hit = None
    key = json.dumps([desc.format, split, entries, desc.names, sorted(desc.aliases.items()),
                      READER_VERSION, desc.root])
    if cache:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        # the folder first: creating it inside root must not change what the fingerprint sees
        path = os.path.join(cache_dir(desc.root), f"{desc.format}-{split}-{digest}.npz")
        fp = fingerprint(key, split_inputs(desc.format, desc.root, entries))
        hit = load_records(path, fp)
        if hit is not None:
            records, report = hit
            issues = DataIssues.from_dict(report, issues.source, strict)
    if hit is None:
        records = read_split(desc.format, desc.root, entries, desc.names, desc.aliases, issues)
        if cache:
            save_records(path, fp, records, issues.to_dict())
    issues.log()
    if not records:
        raise YoloCompressError(f"{desc.source or desc.name}: no usable images in split {split!r} "
                                f"under {desc.root} (data issues: {issues.counts or 'none'})")
    return records, issues


def load_split(desc: DataDescriptor, split: str, cache: bool = True, strict: bool = False) -> list[Record]:
    """Records of `split` ("train", "val" or "test"), from the cache when it is current.

    Bad data is skipped and summarised in one log message; `strict=True` raises on the first problem.
    """
    return load_split_with_issues(desc, split, cache, strict)[0]
