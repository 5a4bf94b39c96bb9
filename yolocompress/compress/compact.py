"""Compact storage of an artifact whose conv weights are shared (codebook + b-bit indices) or
sparse (1-bit mask + the non-zero values): `save_compact` / `load_compact` and the byte formulas.

File: a `.pt` dict (torch.load weights_only=True) {"format": COMPACT_FORMAT, "artifact": the
artifact without the encoded tensors in its state_dict, "encoded": {state_dict key: entry}} with
entry {"kind": "shared", "shape", "codebook" float32 (2^b,), "bits", "indices" uint8 (the b-bit
indices bit-packed, little-endian bit order)} or {"kind": "sparse", "shape", "mask" uint8 (one bit
per weight, packed), "values" float32 (the non-zero weights in row-major order)}. Loading gives
the artifact back with every encoded tensor decoded, for `artifacts.build_model`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import YoloCompressError
from ..fileio import atomic_open

__all__ = ["COMPACT_FORMAT", "pack_bits", "unpack_bits", "encode_shared", "encode_sparse",
           "shared_indices", "decode_entry", "entry_bytes", "save_compact", "load_compact"]

COMPACT_FORMAT = "yolocompress-compact/1"


def pack_bits(indices: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers < 2^bits -> ceil(n * bits / 8) bytes (bit b of value i at bit
    i * bits + b, little-endian)."""
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << bits):
        raise YoloCompressError(f"pack_bits: values must be in [0, {1 << bits}), got "
                                f"[{idx.min()}, {idx.max()}]")
    planes = ((idx[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_bits`: the first `count` values."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    planes = planes[:count * bits].reshape(count, bits).astype(np.int64)
    return planes @ (1 << np.arange(bits))


def encode_shared(codebook: torch.Tensor, indices: torch.Tensor, bits: int) -> dict:
    """A "shared" entry: weight = codebook[indices] (indices of the weight's shape)."""
    return {"kind": "shared", "shape": list(indices.shape), "bits": bits,
            "codebook": codebook.detach().float().cpu().clone(),
            "indices": torch.from_numpy(pack_bits(indices.cpu().numpy(), bits))}


def encode_sparse(weight: torch.Tensor) -> dict:
    """A "sparse" entry: the non-zero pattern as a bit mask and the non-zero values."""
    w = weight.detach().float().cpu()
    nz = (w != 0).flatten()
    return {"kind": "sparse", "shape": list(w.shape),
            "mask": torch.from_numpy(pack_bits(nz.numpy().astype(np.int64), 1)),
            "values": w.flatten()[nz].clone()}


def shared_indices(entry: dict) -> torch.Tensor:
    """The codebook index of every weight of a "shared" entry (int64, the weight's shape)."""
    shape = [int(s) for s in entry["shape"]]
    idx = unpack_bits(entry["indices"].numpy(), int(entry["bits"]), math.prod(shape))
    return torch.from_numpy(idx).reshape(shape)


def decode_entry(entry: dict) -> torch.Tensor:
    """The float32 tensor an entry stands for."""
    shape = [int(s) for s in entry["shape"]]
    count = math.prod(shape)
    if entry["kind"] == "shared":
        return entry["codebook"][shared_indices(entry)]
    if entry["kind"] == "sparse":
        nz = torch.from_numpy(unpack_bits(entry["mask"].numpy(), 1, count).astype(bool))
        out = torch.zeros(count)
        out[nz] = entry["values"]
        return out.reshape(shape)
    raise YoloCompressError(f"unknown compact entry kind '{entry['kind']}'")


def entry_bytes(entry: dict) -> int:
    """Payload bytes: shared ceil(n * b / 8) + 4 * 2^b; sparse ceil(n / 8) + 4 * nnz."""
    count = math.prod(int(s) for s in entry["shape"])
    if entry["kind"] == "shared":
        return math.ceil(count * int(entry["bits"]) / 8) + 4 * entry["codebook"].numel()
    return math.ceil(count / 8) + 4 * entry["values"].numel()


def save_compact(art: dict, encoded: dict[str, dict], path: str | os.PathLike) -> int:
    """Write `art` with the state_dict tensors named in `encoded` stored as their entries
    (atomically); returns the file's size in bytes."""
    missing = [k for k in encoded if k not in art["state_dict"]]
    if missing:
        raise YoloCompressError(f"compact: '{missing[0]}' is not in the artifact's state_dict")
    rest = {k: v for k, v in art["state_dict"].items() if k not in encoded}
    with atomic_open(path, "wb") as f:
        torch.save({"format": COMPACT_FORMAT, "artifact": {**art, "state_dict": rest},
                    "encoded": encoded}, f)
    return Path(path).stat().st_size


def load_compact(path: str | os.PathLike) -> dict:
    """The artifact of a compact file, its encoded tensors decoded (float32)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise YoloCompressError(f"{path}: no such file") from e
    except Exception as e:   # torch raises several types for a file that is not a checkpoint
        raise YoloCompressError(f"{path}: not a compact model file ({type(e).__name__})") from e
    if not isinstance(blob, dict) or blob.get("format") != COMPACT_FORMAT:
        raise YoloCompressError(f"{path}: not a compact model file (format "
                                f"{blob.get('format') if isinstance(blob, dict) else None!r}, "
                                f"expected {COMPACT_FORMAT!r})")
    art = blob["artifact"]
    state = dict(art["state_dict"])
    state.update({k: decode_entry(e) for k, e in blob["encoded"].items()})
    return {**art, "state_dict": state}
