"""Image width/height from the file header (PNG, JPEG, BMP, GIF), with a cv2 fallback.

Reading a header is ~100x faster than decoding the image, which matters for 16k-image sets; a file
whose header cannot be read is reported by the readers as unreadable.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO

import cv2

__all__ = ["image_size"]

def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image from its header (cv2 decode as fallback); None if unreadable."""
    try:
        with open(path, "rb") as f:
            size = _header_size(f)
    except OSError:
        return None
    if size is None:
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        size = None if img is None else (int(img.shape[1]), int(img.shape[0]))
    return size


def _header_size(f: BinaryIO) -> tuple[int, int] | None:
    head = f.read(26)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack("<HH", head[6:10])
    elif head[:2] == b"BM" and len(head) >= 26:
        if struct.unpack("<I", head[14:18])[0] == 12:       # OS/2 BITMAPCOREHEADER
            w, h = struct.unpack("<HH", head[18:22])
        else:
            w, h = struct.unpack("<ii", head[18:26])
            h = abs(h)                                      # negative height = top-down rows
    elif head[:2] == b"\xff\xd8":
        f.seek(2)
        return _jpeg_size(f)
    else:
        return None
    return (w, h) if w > 0 and h > 0 else None


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # frame headers; C4/C8/CC are other tables


def _jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
    while True:
        b = f.read(1)
        while b and b != b"\xff":               # tolerate junk between segments
            b = f.read(1)
        while b == b"\xff":                     # fill bytes
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:   # markers without a length
            continue
        if marker in (0xD9, 0xDA):              # end of image or scan data before any frame header
            return None
        seg = f.read(2)
        if len(seg) < 2:
            return None
        length = struct.unpack(">H", seg)[0]
        if marker in _SOF:
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return (w, h) if w > 0 and h > 0 else None       # h = 0 means "set by DNL": let cv2 decide
        if length < 2:
            return None
        f.seek(length - 2, os.SEEK_CUR)
