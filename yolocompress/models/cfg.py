"""Darknet `.cfg` text <-> list of blocks (pure data).

`parse_cfg(text)` returns `[Block(type="net"), Block(...), ...]`: the `[net]` block first, then one
block per layer in cfg order (layer index = position - 1). `write_cfg(blocks)` writes text that
parses back to equal blocks. Values stay strings; typed getters convert them and report the line.
Which sections and options exist, and their ranges, is models.kinds' table: an unknown section or
option is an error naming the file and line.
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..errors import YoloCompressError
from .block import Block
from .kinds import ALIASES, KINDS, NET_OPTIONS, UNSUPPORTED, check_options, kind_of

__all__ = ["Block", "parse_cfg", "read_cfg", "write_cfg", "set_classes", "validate_blocks",
           "resolve_sources", "input_layers", "yolo_mask"]


def read_cfg(path: str | Path) -> list[Block]:
    """Parse a cfg file; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise YoloCompressError(f"{path}: cannot read cfg ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise YoloCompressError(f"{path}: not a text cfg file") from e
    return parse_cfg(text, source=str(path))


def parse_cfg(text: str, source: str = "<cfg>") -> list[Block]:
    """Darknet cfg text -> blocks, validated (sections, required keys, numbers, route targets)."""
    blocks: list[Block] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise YoloCompressError(f"{source}:{lineno}: malformed section header '{line}'")
            kind = line[1:-1].strip().lower()
            kind = ALIASES.get(kind, kind)
            if kind != "net" and kind not in KINDS:
                what = (f"[{kind}] ({UNSUPPORTED[kind]} layers) is not supported"
                        if kind in UNSUPPORTED else f"unknown section [{kind}]")
                raise YoloCompressError(
                    f"{source}:{lineno}: {what} (supported: [net], "
                    + ", ".join(f"[{k}]" for k in KINDS) + ")")
            blocks.append(Block(kind, {}, lineno, {}, source))
            continue
        if "=" not in line:
            raise YoloCompressError(f"{source}:{lineno}: expected 'key=value', got '{line}'")
        if not blocks:
            raise YoloCompressError(f"{source}:{lineno}: option before the first [section]")
        key, value = (s.strip() for s in line.split("=", 1))
        blocks[-1].options[key] = value
        blocks[-1].key_lines[key] = lineno
    if not blocks or blocks[0].type != "net":
        raise YoloCompressError(f"{source}: a cfg must start with a [net] section")
    if any(b.type == "net" for b in blocks[1:]):
        b = next(b for b in blocks[1:] if b.type == "net")
        raise YoloCompressError(f"{b.where()}: a second [net] section")
    if len(blocks) == 1:
        raise YoloCompressError(f"{source}: the cfg has no layers")
    validate_blocks(blocks)
    return blocks


def validate_blocks(blocks: list[Block]) -> None:
    """Options (known, typed, in range) of every block and the layers each one reads;
    raises YoloCompressError naming the file and line."""
    # [net] options other than the input's shape only steer Darknet's training, and Darknet
    # itself ignores the ones it does not know; a user's cfg must not fail on a new one
    check_options(blocks[0], NET_OPTIONS, ignore_unknown=True)
    for i, b in enumerate(blocks[1:]):
        kind_of(b).validate(b)
        resolve_sources(blocks, i)


def resolve_sources(blocks: list[Block], index: int) -> list[int]:
    """Absolute indices of the layers layer `index` reads (models.kinds: `refs`, after the
    previous layer where the kind reads that too), checked to lie before it; -1 is the image."""
    b = blocks[index + 1]
    kind = kind_of(b)
    if kind.refs is None:
        return [index - 1]
    key = kind.refs
    refs = b.get_ints(key)
    if not refs:
        raise YoloCompressError(f"{b.where(key)}: [{b.type}] '{key}' is empty")
    if kind.max_refs is not None and len(refs) > kind.max_refs:
        raise YoloCompressError(f"{b.where(key)}: [{b.type}] takes at most {kind.max_refs} "
                                f"layer(s) in '{key}', got {len(refs)}")
    out = []
    for r in refs:
        src = index + r if r < 0 else r
        if not 0 <= src < index:
            raise YoloCompressError(
                f"{b.where(key)}: [{b.type}] at layer {index} points to layer {src} "
                f"('{key}' entry {r}), outside layers 0..{index - 1}")
        out.append(src)
    if kind.with_previous:
        out = [index - 1] + out
    return out


input_layers = resolve_sources     # the layers whose outputs a layer reads; -1 is the image


def write_cfg(blocks: list[Block]) -> str:
    """Blocks -> cfg text; `parse_cfg(write_cfg(b)) == b`."""
    parts = []
    for i, b in enumerate(blocks):
        header = f"[{b.type}]" if b.type == "net" else f"# layer {i - 1}\n[{b.type}]"
        lines = [header] + [f"{k}={v}" for k, v in b.options.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def set_classes(blocks: list[Block], classes: int) -> list[Block]:
    """A copy with every [yolo] `classes` and the filters of the conv feeding it set for `classes`."""
    if classes < 1:
        raise YoloCompressError(f"classes must be >= 1, got {classes}")
    out = copy.deepcopy(blocks)
    for i, b in enumerate(out[1:]):
        if b.type != "yolo":
            continue
        num_anchors = len(yolo_mask(b))
        prev = out[i]                       # block of layer i-1
        if prev.type != "convolutional":
            raise YoloCompressError(f"{b.where()}: [yolo] at layer {i} is not preceded by a conv")
        b.set("classes", classes)
        prev.set("filters", (classes + 5) * num_anchors)
    return out


def yolo_mask(b: Block) -> list[int]:
    """Anchor indices of a [yolo] block (all anchors when `mask` is absent)."""
    n_anchors = len(b.get_floats("anchors")) // 2
    mask = b.get_ints("mask", list(range(n_anchors)))
    bad = [m for m in mask if not 0 <= m < n_anchors]
    if bad:
        raise YoloCompressError(f"{b.where('mask')}: mask {bad} outside the {n_anchors} anchors")
    return mask
