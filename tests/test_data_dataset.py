"""DetectionDataset, collate, to_original and build_loader: shapes, exact inverse maps, errors, determinism."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch

from yolocompress.config import AugmentConfig
from yolocompress.data.dataset import DetectionDataset, build_loader, collate, to_original
from yolocompress.data.records import Record
from yolocompress.errors import YoloCompressError

SIZES = [(120, 80), (64, 64), (90, 150), (200, 100), (77, 131), (100, 100)]   # (w, h)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    """Images of mixed sizes with white rectangles (RGB white) exactly where their boxes are."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate(SIZES):
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 2] = 60   # BGR red channel: tells RGB from BGR after loading
        boxes, labels = [], []
        for k in range(3):
            x1, y1 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x2, y2 = x1 + int(rng.integers(8, 20)), y1 + int(rng.integers(8, 20))
            img[y1:y2, x1:x2] = 255
            boxes.append((x1, y1, x2, y2))
            labels.append(k)
        path = folder / f"im{i}.png"   # lossless, so pixel checks are exact
        cv2.imwrite(str(path), img)
        out.append(Record(str(path), w, h, boxes, labels, difficult=[False, False, i % 2 == 1]))
    return out


def test_eval_sample_shapes_dtypes_and_meta(records):
    ds = DetectionDataset(records, 64, augment=None, letterbox=True)
    img, targets, meta = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64)
    assert targets.dtype == torch.float32 and targets.shape == (2, 6)   # the difficult box is dropped
    assert targets[:, 0].eq(0).all() and targets[:, 1].tolist() == [0.0, 1.0]
    assert meta["index"] == 3 and meta["image_id"] == "im3" and meta["orig_size"] == (100, 200)
    assert meta["scale"] == (0.32, 0.32) and meta["pad"] == (0, 16)
    # RGB: the BGR-red 60 background appears in channel 0 of the tensor
    assert img[0, 20, 0] == 60 and img[2, 20, 0] == 0


@pytest.mark.parametrize("use_letterbox", [True, False])
def test_to_original_round_trip_is_exact(records, use_letterbox):
    ds = DetectionDataset(records, 96, letterbox=use_letterbox, drop_difficult=False)
    for i, r in enumerate(records):
        _, targets, meta = ds[i]
        back = to_original(targets[:, 2:], meta)
        np.testing.assert_allclose(back.numpy(), r.boxes, atol=1e-4)
        np.testing.assert_allclose(to_original(targets[:, 2:].numpy(), meta), r.boxes, atol=1e-4)


def test_targets_lie_on_the_white_pixels(records):
    ds = DetectionDataset(records, 128, letterbox=True)
    img, targets, _ = ds[0]
    white = img.min(0).values > 200
    for _, _, x1, y1, x2, y2 in targets.tolist():
        inner = white[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
        assert inner.numel() and inner.all()


def test_to_original_clips_and_refuses_augmented_meta(records):
    ds = DetectionDataset(records, 64, letterbox=True)
    _, _, meta = ds[3]   # 200x100 -> pad (0, 16)
    np.testing.assert_allclose(to_original(np.array([[-5, 0, 70, 64]], np.float32), meta), [[0, 0, 200, 100]])
    with pytest.raises(ValueError, match="augmented"):
        to_original(np.zeros((1, 4)), {"image_id": "x", "scale": None, "pad": None, "orig_size": (1, 1)})


@pytest.mark.parametrize("mosaic", [0.0, 1.0])
def test_augmented_samples_are_valid(records, mosaic):
    aug = AugmentConfig(mosaic=mosaic, degrees=10, translate=0.1)
    ds = DetectionDataset(records, 64, augment=aug)
    for seed in range(5):
        ds.reseed(seed)
        for i in range(len(ds)):
            img, targets, meta = ds[i]
            assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
            b = targets[:, 2:]
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert (b >= 0).all() and (b <= 64).all()
            assert set(targets[:, 1].tolist()) <= {0.0, 1.0, 2.0}
            assert meta["scale"] is None


def test_collate_stacks_uint8_and_numbers_targets(records):
    ds = DetectionDataset(records, 64, letterbox=False)
    batch = [ds[i] for i in (0, 1, 3)]
    images, targets, metas = collate(batch)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 64, 64)
    assert targets.shape == (3 + 2 + 2, 6) and targets.dtype == torch.float32   # odd records: one difficult
    assert targets[:, 0].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert [m["index"] for m in metas] == [0, 1, 3]
    assert batch[1][1][:, 0].eq(0).all()   # the samples themselves are left untouched


def test_cache_images_gives_the_same_samples(records):
    plain = DetectionDataset(records, 64, letterbox=True)
    cached = DetectionDataset(records, 64, letterbox=True, cache_images=True)
    for i in range(len(records)):
        assert torch.equal(plain[i][0], cached[i][0]) and torch.equal(plain[i][1], cached[i][1])


def test_unreadable_and_mis_sized_images_name_the_file(records, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(YoloCompressError, match="broken.jpg: cannot read image"):
        DetectionDataset([Record(str(bad), 10, 10)], 64)[0]
    wrong = Record(records[0].image, 121, 80)
    with pytest.raises(YoloCompressError, match="im0.png: image is 120x80 but its annotation says 121x80"):
        DetectionDataset([wrong], 64, cache_images=True, strict=True)
    with pytest.raises(YoloCompressError, match="im0.png: image is 120x80"):   # evaluation: no skipping
        DetectionDataset([wrong], 64, cache_images=True)[0]


def _garbled_jpeg(path, w: int, h: int) -> None:
    """A JPEG whose header (and so its size) reads fine but whose body is noise: cv2 decodes nothing."""
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8))
    data = buf.tobytes()
    path.write_bytes(data[:200] + bytes(np.random.default_rng(1).integers(0, 255, len(data) - 200, np.uint8)))


@pytest.fixture
def one_garbled(records, tmp_path):
    """The records with record 2 replaced by a garbled JPEG of the same size."""
    bad = tmp_path / "garbled.jpg"
    _garbled_jpeg(bad, records[2].width, records[2].height)
    r = records[2]
    return records[:2] + [Record(str(bad), r.width, r.height, r.boxes, r.labels, r.difficult)] + records[3:]


@pytest.mark.parametrize("cache_images", [False, True])
def test_a_garbled_training_image_is_replaced_by_the_next_readable_one(records, one_garbled, cache_images):
    ds = DetectionDataset(one_garbled, 64, augment=AugmentConfig(mosaic=0.0), cache_images=cache_images)
    ref = DetectionDataset(records, 64, augment=AugmentConfig(mosaic=0.0))
    ds.reseed(5)
    ref.reseed(5)
    img, targets, meta = ds[2]
    img3, targets3, _ = ref[3]          # record 3 in its place, with the same random draws
    assert torch.equal(img, img3) and torch.equal(targets, targets3)
    assert len(meta["replaced"]) == 1 and "garbled.jpg: cannot read image" in meta["replaced"][0]
    assert ds[1][2]["replaced"] == []
    assert ds[2][2]["replaced"] == []   # known bad now: skipped without a second attempt or note


def test_strict_makes_a_garbled_training_image_an_error(one_garbled):
    ds = DetectionDataset(one_garbled, 64, augment=AugmentConfig(mosaic=0.0), strict=True)
    with pytest.raises(YoloCompressError, match="garbled.jpg: cannot read image"):
        ds[2]
    with pytest.raises(YoloCompressError, match="garbled.jpg: cannot read image"):
        DetectionDataset(one_garbled, 64, augment=AugmentConfig(), cache_images=True, strict=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_reports_each_replaced_image_once(one_garbled, workers, caplog):
    ds = DetectionDataset(one_garbled, 64, augment=AugmentConfig(mosaic=1.0))
    loader = build_loader(ds, 3, True, workers, seed=0, pin_memory=False)
    with caplog.at_level("WARNING", logger="yolocompress.data"):
        for _ in range(3):
            assert sum(len(b[0]) for b in loader) == len(one_garbled)   # every sample is there
    assert len(loader.replaced) == 1 and "garbled.jpg" in loader.replaced[0]
    warnings = [r.getMessage() for r in caplog.records if "garbled.jpg" in r.getMessage()]
    assert len(warnings) == 1 and "next readable image" in warnings[0] and "1 bad image" in warnings[0]


def test_no_readable_training_image_is_one_error(tmp_path):
    bad = tmp_path / "garbled.jpg"
    _garbled_jpeg(bad, 50, 40)
    ds = DetectionDataset([Record(str(bad), 50, 40)] * 2, 64, augment=AugmentConfig())
    with pytest.raises(YoloCompressError, match="none of the 2 training images can be read, e.g. .*garbled"):
        ds[0]


def test_a_worker_error_reaches_the_caller_as_its_one_line_message(one_garbled):
    loader = build_loader(DetectionDataset(one_garbled, 64), 2, False, 2, seed=0, pin_memory=False)
    with pytest.raises(YoloCompressError) as e:
        list(loader)
    assert str(e.value).endswith("garbled.jpg: cannot read image (missing, unreadable or not an image)")
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_bad_arguments(records):
    with pytest.raises(ValueError, match="multiple of 32"):
        DetectionDataset(records, 100)
    with pytest.raises(ValueError, match="torch.distributed"):
        build_loader(DetectionDataset(records, 64), 2, True, 0, seed=0, distributed=True)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    return [(im, t, [m["index"] for m in metas]) for im, t, metas in loader]


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


def test_loader_with_two_workers_is_deterministic_given_the_seed(records):
    ds = DetectionDataset(records, 64, augment=AugmentConfig())
    kw = dict(batch_size=2, shuffle=True, workers=2, pin_memory=False)
    first = build_loader(ds, seed=7, **kw)
    a1, a2 = _epoch(first), _epoch(first)
    b1 = _epoch(build_loader(ds, seed=7, **kw))
    c1 = _epoch(build_loader(ds, seed=8, **kw))
    assert len(a1) == 3 and _same(a1, b1)
    assert not _same(a1, c1)
    assert not _same(a1, a2)   # the next epoch draws new order and augmentation


def test_loader_in_main_process_is_deterministic_given_the_seed(records):
    ds = DetectionDataset(records, 64, augment=AugmentConfig())
    a = _epoch(build_loader(ds, 4, True, 0, seed=3, drop_last=True))
    b = _epoch(build_loader(ds, 4, True, 0, seed=3, drop_last=True))
    assert len(a) == 1 and _same(a, b)


def test_distributed_loader_shards_with_a_seeded_sampler(records, tmp_path):
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = build_loader(DetectionDataset(records, 64), 2, True, 0, seed=5, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == 5
        orders = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            orders.append([m["index"] for _, _, metas in loader for m in metas])
        assert sorted(orders[0]) == sorted(orders[1]) == list(range(len(records)))
        assert orders[0] != orders[1]
    finally:
        dist.destroy_process_group()
