"""Torch Dataset over `Record`s, its collate function and a loader factory (plain or distributed).

A sample is `(img uint8 (3, H, W) RGB, targets float32 (n, 6) = [0, class, x1, y1, x2, y2] in input
pixels, meta)`; without augmentation `to_original(boxes, meta)` maps input-pixel boxes back to the
original image exactly. `collate` keeps images uint8 (the trainer converts on the device).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
from tqdm import tqdm

from ..config import IMG_SIZE_RULE, AugmentConfig, valid_img_size
from ..errors import YoloCompressError
from .records import Record
from .transforms import augment_hsv, hflip, letterbox, mosaic4, random_affine, resize, scale_boxes

__all__ = ["DetectionDataset", "collate", "to_original", "build_loader", "seed_worker"]

_log = logging.getLogger("yolocompress.data")


def _read_rgb(record: Record) -> np.ndarray:
    # Stored orientation (EXIF ignored), as Darknet and the readers measure the image.
    img = cv2.imread(record.image, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise YoloCompressError(f"{record.image}: cannot read image (missing, unreadable or not an image)")
    if img.shape[:2] != (record.height, record.width):
        raise YoloCompressError(f"{record.image}: image is {img.shape[1]}x{img.shape[0]} but its annotation "
                                f"says {record.width}x{record.height}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class DetectionDataset(Dataset):
    """Records -> fixed-size training or evaluation samples.

    With `augment` a sample is Darknet-style: with probability `augment.mosaic` a mosaic of this and
    three random other images, each jitter-cropped, HSV-distorted and maybe flipped; otherwise one such
    image. Without it the image is letterboxed (`letterbox=True`) or stretched to img_size, and meta's
    `scale`/`pad` invert that; for augmented samples they are None. Difficult boxes are left out of the
    targets when `drop_difficult` (Darknet's voc_label.py skips them); evaluation reads them from the
    records. Randomness comes from `self.rng`, which `build_loader` reseeds per worker.

    `augment` is the validated `augment` section of the experiment (`config.AugmentConfig`); with
    `letterbox` its jitter crop keeps the aspect ratio too. An image that fails to decode (garbled
    body, size disagreeing with its annotation) ends evaluation with an error, but in training,
    unless `strict`, the sample is replaced by the next readable record (index + 1, + 2, ... mod
    len: deterministic, no random draw) and the failed file is named in meta["replaced"], which
    `build_loader`'s loader reports once per file.
    """

    def __init__(self, records: Sequence[Record], img_size: int, augment: AugmentConfig | None = None,
                 letterbox: bool = False, cache_images: bool = False, drop_difficult: bool = True,
                 strict: bool = False) -> None:
        if not valid_img_size(img_size):
            raise ValueError(f"img_size {IMG_SIZE_RULE}, got {img_size}")
        self.records = list(records)
        self.img_size = img_size
        self.augment = augment
        self.letterbox = letterbox
        self.drop_difficult = drop_difficult
        self.strict = strict
        self.base_seed = 0
        self.rng = np.random.default_rng(0)
        self._bad: dict[int, str] = {}   # index -> why it does not decode, known in this process
        self._cache: list[np.ndarray | str] | None = None   # an image, or why it cannot be read
        if cache_images:
            self._cache = [self._read_or_reason(r) for r in tqdm(
                self.records, desc="caching images", unit="img", disable=None, leave=False)]

    def _read_or_reason(self, record: Record) -> np.ndarray | str:
        try:
            return _read_rgb(record)
        except YoloCompressError as e:
            if self.strict:
                raise
            return str(e)

    def __len__(self) -> int:
        return len(self.records)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream (called per DataLoader worker by `seed_worker`)."""
        self.base_seed = seed
        self.rng = np.random.default_rng(seed)

    def set_epoch(self, epoch: int) -> None:
        """Make the main-process stream (workers == 0) a function of (seed, epoch), so that a
        resumed run draws the same augmentations; workers are reseeded by `seed_worker`."""
        self.rng = np.random.default_rng([self.base_seed, epoch])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Original RGB image, boxes (N, 4) float32 and labels (N,) int64 of one record."""
        r = self.records[index]
        img = self._cache[index] if self._cache is not None else _read_rgb(r)
        if isinstance(img, str):
            raise YoloCompressError(img)
        keep = ~r.difficult if self.drop_difficult else np.ones(len(r), bool)
        return img, r.boxes[keep], r.labels[keep]

    def _load_readable(self, index: int, replaced: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`load(index)`, or (not strict) that of the next readable record; failures go to `replaced`."""
        n = len(self.records)
        for j in ((index + k) % n for k in range(n)):
            if j in self._bad:
                continue
            try:
                return self.load(j)
            except YoloCompressError as e:
                if self.strict:
                    raise
                self._bad[j] = str(e)
                replaced.append(str(e))
        raise YoloCompressError(f"none of the {n} training images can be read, e.g. "
                                f"{next(iter(self._bad.values()))}")

    def _augmented(self, index: int, replaced: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, rng = self.augment, self.rng
        img, boxes, labels = self._load_readable(index, replaced)
        img, boxes, labels = random_affine(img, boxes, labels, rng, self.img_size, a.jitter, a.translate,
                                           a.degrees, self.letterbox)
        img = augment_hsv(img, rng, a.hsv_h, a.hsv_s, a.hsv_v)
        if rng.random() < a.flip:
            img, boxes = hflip(img, boxes)
        return img, boxes, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        r = self.records[index]
        meta: dict[str, Any] = {"index": index, "image_id": r.image_id, "orig_size": (r.height, r.width),
                                "scale": None, "pad": None}
        if self.augment is not None:
            meta["replaced"] = []
            if self.rng.random() < self.augment.mosaic:
                others = self.rng.integers(0, len(self), 3)
                parts = [self._augmented(int(j), meta["replaced"]) for j in (index, *others)]
                img, boxes, labels = mosaic4(parts, self.img_size, self.rng)
            else:
                img, boxes, labels = self._augmented(index, meta["replaced"])
        else:
            img, boxes, labels = self.load(index)
            if self.letterbox:
                img, scale, pad = letterbox(img, self.img_size)
            else:
                (img, scale), pad = resize(img, self.img_size), (0, 0)
            boxes = scale_boxes(boxes, scale, pad)
            meta["scale"], meta["pad"] = scale, pad
        targets = np.zeros((len(boxes), 6), np.float32)
        targets[:, 1] = labels
        targets[:, 2:] = boxes
        chw = np.ascontiguousarray(img.transpose(2, 0, 1))
        return torch.from_numpy(chw), torch.from_numpy(targets), meta


def to_original(boxes: np.ndarray | torch.Tensor, meta: dict[str, Any], clip: bool = True
                ) -> np.ndarray | torch.Tensor:
    """Map xyxy boxes (..., 4) from input pixels back to the original image: (x - pad) / scale."""
    if meta.get("scale") is None:
        raise ValueError(f"sample {meta.get('image_id')!r} was augmented; its boxes have no inverse map")
    (sx, sy), (px, py) = meta["scale"], meta["pad"]
    h, w = meta["orig_size"]
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float32)
    out[..., 0::2] = (out[..., 0::2] - px) / sx
    out[..., 1::2] = (out[..., 1::2] - py) / sy
    if clip:
        out[..., 0::2] = out[..., 0::2].clip(0, w)
        out[..., 1::2] = out[..., 1::2].clip(0, h)
    return out


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]
            ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Stack uint8 images (B, 3, H, W); concatenate targets with column 0 = index in the batch."""
    images = torch.stack([b[0] for b in batch])
    targets = []
    for i, (_, t, _) in enumerate(batch):
        t = t.clone()
        t[:, 0] = i
        targets.append(t)
    return images, torch.cat(targets), [b[2] for b in batch]


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy, random and the dataset's stream from torch's per-worker
    seed (base seed from the loader's generator + worker id); keep cv2 single-threaded."""
    seed = torch.initial_seed()
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    cv2.setNumThreads(0)
    dataset = get_worker_info().dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)


class _Loader(DataLoader):
    """A DataLoader that warns once per file about training images the dataset replaced
    (meta["replaced"]), and gives a YoloCompressError raised in a worker its one-line message
    back (torch re-raises it with the worker's traceback as the message)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replaced: list[str] = []    # why each replaced image could not be used, first seen first

    def __iter__(self):
        try:
            for batch in super().__iter__():
                for meta in batch[2]:
                    for reason in meta.get("replaced", ()):
                        if reason not in self.replaced:
                            self.replaced.append(reason)
                            _log.warning("%s; skipped, training uses the next readable image in its "
                                         "place (%d bad image(s) so far; data.strict=true makes this "
                                         "an error)", reason, len(self.replaced))
                yield batch
        except YoloCompressError as e:
            text = str(e)
            if "\nOriginal Traceback" not in text:
                raise
            raise YoloCompressError(text.rsplit("YoloCompressError: ", 1)[-1].strip()) from e


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int,
                 distributed: bool = False, drop_last: bool = False, pin_memory: bool | None = None,
                 persistent_workers: bool = False, prefetch_factor: int = 2,
                 sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader with `collate` and deterministic seeding.

    Order and augmentation depend only on `seed` (and the rank under DDP). With `distributed` a
    DistributedSampler shards the data (same shuffle on every rank); the caller must call
    `loader.sampler.set_epoch(epoch)` before each epoch, or every epoch repeats the first order.
    With workers == 0 the dataset's stream is reseeded here once and cv2 is made single-threaded in
    this process (its thread pool next to torch's made loading 4x slower on 2 cores); with workers
    each worker is reseeded per epoch (or once with persistent_workers) by `seed_worker`.
    `pin_memory=None` pins when CUDA is available. A given `sampler` replaces both (the Trainer's
    `SeededRandomSampler`, whose order is a function of (seed, epoch), shards under DDP too).
    """
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if initialised else 0
    if sampler is None and distributed:
        if not initialised:
            raise ValueError("distributed=True needs torch.distributed initialised (torchrun)")
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    generator = torch.Generator().manual_seed(seed + rank)
    if workers == 0:
        cv2.setNumThreads(0)
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed + rank)
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers} if workers else {}
    return _Loader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      worker_init_fn=seed_worker, generator=generator, **extra)
