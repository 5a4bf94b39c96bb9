"""Darknet `.cfg` text <-> list of blocks (pure data, no torch).

`parse_cfg(text)` returns `[Block(type="net"), Block(...), ...]`: the `[net]` block first, then one
block per layer in cfg order (layer index = position - 1). `write_cfg(blocks)` writes text that
parses back to equal blocks. Values stay strings; typed getters convert them and report the line.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import YoloCompressError

__all__ = ["Block", "parse_cfg", "read_cfg", "write_cfg", "set_classes", "LAYER_KINDS",
           "resolve_sources", "input_layers"]

# Section -> keys that must be present; the value checks below cover numeric keys.
LAYER_KINDS: dict[str, tuple[str, ...]] = {
    "convolutional": ("filters", "size"),
    "route": ("layers",),
    "shortcut": ("from",),
    "maxpool": (),
    "upsample": (),
    "yolo": ("anchors",),
}
_SECTION_ALIASES = {"conv": "convolutional", "network": "net"}
_INT_KEYS = {
    "net": ("batch", "subdivisions", "width", "height", "channels", "burn_in", "max_batches",
            "letter_box", "mosaic"),
    "convolutional": ("batch_normalize", "filters", "size", "stride", "pad", "padding", "groups",
                      "stopbackward", "dilation"),
    "route": ("groups", "group_id"),
    "maxpool": ("size", "stride", "padding"),
    "upsample": ("stride",),
    "yolo": ("classes", "num", "random", "new_coords", "max_delta"),
}
_FLOAT_KEYS = {
    "net": ("momentum", "decay", "learning_rate", "angle", "saturation", "exposure", "hue"),
    "yolo": ("jitter", "ignore_thresh", "truth_thresh", "scale_x_y", "iou_thresh",
             "cls_normalizer", "iou_normalizer", "obj_normalizer", "beta_nms"),
}
_INT_LIST_KEYS = {"route": ("layers",), "shortcut": ("from",), "yolo": ("mask",)}
_FLOAT_LIST_KEYS = {"yolo": ("anchors",)}


@dataclass
class Block:
    """One `[section]`: its type, its key=value options (strings, in file order) and where it came from."""
    type: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = field(default=0, compare=False)     # line of the section header (0 = built in code)
    key_lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="<cfg>", compare=False, repr=False)

    def where(self, key: str | None = None) -> str:
        line = self.key_lines.get(key, self.line) if key else self.line
        return f"{self.source}:{line}" if line else self.source

    def has(self, key: str) -> bool:
        return key in self.options

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def _required(self, key: str) -> YoloCompressError:
        return YoloCompressError(f"{self.where()}: [{self.type}] is missing '{key}'")

    def _lookup(self, key: str, default) -> str | None:
        """The raw text of `key`; None when absent and a default exists; an error otherwise."""
        raw = self.options.get(key)
        if raw is None and default is None:
            raise self._required(key)
        return raw

    def get_int(self, key: str, default: int | None = None) -> int:
        raw = self._lookup(key, default)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = None
            if value is None or value != int(value):
                raise YoloCompressError(
                    f"{self.where(key)}: '{key}={raw}' is not an integer") from None
            return int(value)

    def get_float(self, key: str, default: float | None = None) -> float:
        raw = self._lookup(key, default)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            raise YoloCompressError(f"{self.where(key)}: '{key}={raw}' is not a number") from None

    def get_ints(self, key: str, default: list[int] | None = None) -> list[int]:
        return [int(v) for v in self._list(key, default, int, "integers")]

    def get_floats(self, key: str, default: list[float] | None = None) -> list[float]:
        return [float(v) for v in self._list(key, default, float, "numbers")]

    def _list(self, key, default, conv, what):
        raw = self._lookup(key, default)
        if raw is None:
            return list(default)
        try:
            return [conv(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise YoloCompressError(
                f"{self.where(key)}: '{key}={raw}' is not a list of {what}") from None

    def set(self, key: str, value) -> None:
        self.options[key] = str(value)


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
            kind = _SECTION_ALIASES.get(kind, kind)
            if kind != "net" and kind not in LAYER_KINDS:
                raise YoloCompressError(
                    f"{source}:{lineno}: unknown section [{kind}] (supported: [net], "
                    + ", ".join(f"[{k}]" for k in LAYER_KINDS) + ")")
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
    """Required keys, numeric values and route/shortcut targets; raises YoloCompressError."""
    for b in blocks:
        for key in LAYER_KINDS.get(b.type, ()):
            if key not in b.options:
                raise b._required(key)
        for key in _INT_KEYS.get(b.type, ()):
            if key in b.options:
                b.get_int(key)
        for key in _FLOAT_KEYS.get(b.type, ()):
            if key in b.options:
                b.get_float(key)
        for key in _INT_LIST_KEYS.get(b.type, ()):
            if key in b.options:
                b.get_ints(key)
        for key in _FLOAT_LIST_KEYS.get(b.type, ()):
            if key in b.options:
                b.get_floats(key)
    for i, b in enumerate(blocks[1:]):
        if b.type in ("route", "shortcut"):
            resolve_sources(blocks, i)


def resolve_sources(blocks: list[Block], index: int) -> list[int]:
    """Absolute layer indices a route/shortcut at layer `index` reads, checked to lie before it."""
    b = blocks[index + 1]
    key = "layers" if b.type == "route" else "from"
    refs = b.get_ints(key)
    if not refs:
        raise YoloCompressError(f"{b.where(key)}: [{b.type}] '{key}' is empty")
    if b.type == "route" and len(refs) > 4:
        raise YoloCompressError(f"{b.where(key)}: [route] takes at most 4 layers, got {len(refs)}")
    out = []
    for r in refs:
        src = index + r if r < 0 else r
        if not 0 <= src < index:
            raise YoloCompressError(
                f"{b.where(key)}: [{b.type}] at layer {index} points to layer {src} "
                f"('{key}' entry {r}), outside layers 0..{index - 1}")
        out.append(src)
    if b.type == "shortcut":
        out = [index - 1] + out
    return out


def input_layers(blocks: list[Block], index: int) -> list[int]:
    """Layers whose outputs layer `index` reads (routes/shortcuts: their sources; else the previous
    layer); -1 is the input image."""
    if blocks[index + 1].type in ("route", "shortcut"):
        return resolve_sources(blocks, index)
    return [index - 1]


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
