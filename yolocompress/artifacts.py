"""Checkpoint artifacts: the plain-dict `.pt` files that chain the stages (DESIGN.md contract).

Keys: format, stage, cfg (Darknet text), state_dict, classes (names), input_size [h, w], config,
metrics, parent (sha256 of the parent artifact file or None), lineage (ancestors, oldest first),
prune (optional), gating (optional: an FBS-gated model, compress/gating.py),
train_state (last.pt only). Saved atomically; loaded with weights_only=True and
checked: format, required keys, cfg parses, and the state_dict fits the model the cfg builds.
Valid stages are the registry's (stages.py). `load_parent` is how every stage reads its input
artifact: validated, of a stage the consumer accepts, with the data set's classes; `lineage_of`
is the lineage its child records.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import IMG_SIZE_RULE, valid_img_size
from .errors import YoloCompressError
from .fileio import atomic_open
from .models.cfg import parse_cfg, write_cfg
from .models.darknet import Darknet
from .stages import get_stage, stage_names

__all__ = ["FORMAT", "make_artifact", "save_artifact", "load_artifact", "build_model",
           "file_sha256", "artifact_from_model", "load_parent", "lineage_of"]

FORMAT = "yolocompress/1"
_REQUIRED = ("format", "stage", "cfg", "state_dict", "classes", "input_size", "config",
             "metrics", "parent")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_artifact(stage: str, cfg: str, state_dict: dict[str, torch.Tensor], classes: list[str],
                  input_size: tuple[int, int] | list[int], config: dict | None = None,
                  metrics: dict | None = None, parent: str | None = None,
                  lineage: list[dict] | None = None, **extra: Any) -> dict:
    """A validated-shape artifact dict; tensors are detached copies on the CPU."""
    if stage not in stage_names():
        raise YoloCompressError(f"unknown artifact stage '{stage}' (one of "
                                f"{', '.join(stage_names())})")
    art = {
        "format": FORMAT, "stage": stage, "cfg": cfg,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "classes": list(classes), "input_size": [int(s) for s in input_size],
        "config": config or {}, "metrics": metrics or {}, "parent": parent,
        "lineage": list(lineage or []),
    }
    art.update(extra)
    return art


def artifact_from_model(model: Darknet, stage: str, classes: list[str], **kw: Any) -> dict:
    """Artifact of a built model: its cfg text, state_dict and input size."""
    return make_artifact(stage, write_cfg(model.blocks), model.state_dict(), classes,
                         kw.pop("input_size", model.input_size), **kw)


def save_artifact(art: dict, path: str | os.PathLike) -> str:
    """Write atomically; returns the file's sha256 (what children record as `parent`)."""
    with atomic_open(path, "wb") as f:
        torch.save(art, f)
    return file_sha256(path)


def load_artifact(path: str | os.PathLike, check: bool = True) -> dict:
    """Load with weights_only=True and validate; any problem is a one-line YoloCompressError."""
    path = Path(path)
    if not path.is_file():
        raise YoloCompressError(f"{path}: no such artifact file")
    try:
        art = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names a refused class as "Unsupported global: GLOBAL x.Y";
        # any other complaint of it is about bytes that are no pickle at all
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise YoloCompressError(f"{path}: not a plain-data artifact: it holds a pickled Python "
                                    f"object ({found.group(1)}), which is refused for safety (only "
                                    f"tensors, numbers, strings, lists and dicts are loaded)") from e
        raise YoloCompressError(f"{path}: not a readable artifact (corrupt or not a .pt file)") from e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, struct.error) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise YoloCompressError(f"{path}: not a readable artifact (corrupt or truncated?): "
                                f"{first[:200]}") from e
    if not isinstance(art, dict) or "format" not in art:
        raise YoloCompressError(f"{path}: not a yolocompress artifact (no 'format' key)")
    if art["format"] != FORMAT:
        raise YoloCompressError(f"{path}: artifact format '{art['format']}' is not supported "
                                f"(this version reads '{FORMAT}')")
    missing = [k for k in _REQUIRED if k not in art]
    if missing:
        raise YoloCompressError(f"{path}: artifact is missing {', '.join(missing)}")
    _check_fields(art, str(path))
    if check:
        build_model(art, source=str(path))
    return art


def _check_fields(art: dict, source: str) -> None:
    """The plain fields commands read directly: input_size [h, w], classes, cfg, state_dict."""
    size = art["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(valid_img_size, size))):
        raise YoloCompressError(f"{source}: input_size must be [height, width], each {IMG_SIZE_RULE}; "
                                f"got {str(size)[:60]}")
    classes = art["classes"]
    if not (isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes)):
        raise YoloCompressError(f"{source}: classes must be a non-empty list of names; got "
                                f"{str(classes)[:60]}")
    if not isinstance(art["cfg"], str):
        raise YoloCompressError(f"{source}: cfg must be Darknet cfg text, got a {type(art['cfg']).__name__}")
    sd = art["state_dict"]
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise YoloCompressError(f"{source}: state_dict must map names to tensors")


def load_parent(path: str | os.PathLike, names: Sequence[str] | None, stage: str | None = None,
                role: str = "parent") -> dict:
    """The artifact at `path` as the `role` input of `stage` (None: any stage may be read):
    loaded and checked, its stage one `stage` accepts, its classes the data set's `names` (None:
    not checked); `sha256` and `path` (resolved) are added."""
    path = Path(path)
    if path.suffix != ".pt":
        raise YoloCompressError(f"{path}: the {role} must be an artifact (.pt)")
    art = load_artifact(path)
    if stage is not None and not get_stage(stage).accepts(art["stage"]):
        accepted = ", ".join(get_stage(stage).parents or ())
        raise YoloCompressError(f"{path}: a '{art['stage']}' artifact; the {role} of {stage} must "
                                f"be one of: {accepted}")
    if names is not None and list(art["classes"]) != list(names):
        raise YoloCompressError(f"{path}: {role} classes {art['classes']} differ from the data "
                                f"set's {list(names)}")
    art["sha256"], art["path"] = file_sha256(path), str(path.resolve())
    return art


def lineage_of(parent: dict | None) -> list[dict]:
    """The lineage a child of `parent` (from load_parent) records: its ancestors, then itself."""
    if parent is None:
        return []
    return list(parent.get("lineage", [])) + [
        {"stage": parent["stage"], "sha256": parent["sha256"], "path": parent["path"]}]


def build_model(art: dict, source: str = "<artifact>") -> Darknet:
    """The Darknet model an artifact describes, with its weights loaded (strict)."""
    blocks = parse_cfg(art["cfg"], source=f"{source}[cfg]")
    model = Darknet(blocks)
    if art.get("gating") is not None:      # FBS: the gated model (compress/gating.py)
        from .compress.gating import apply_gating
        model = apply_gating(model, art["gating"], source)
    if model.classes != len(art["classes"]):
        raise YoloCompressError(f"{source}: cfg has {model.classes} classes but the artifact "
                                f"names {len(art['classes'])}")
    expected = model.state_dict()
    sd = art["state_dict"]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise YoloCompressError(f"{source}: cfg and state_dict disagree ({what}; "
                                f"{len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise YoloCompressError(f"{source}: cfg and state_dict disagree: {k} has shape "
                                    f"{tuple(sd[k].shape)}, the cfg needs {tuple(v.shape)}")
    model.load_state_dict(sd)
    return model
