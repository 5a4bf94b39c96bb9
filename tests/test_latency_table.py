"""Latency tables (compress.latency_table): interpolation, prediction, measurement structure, the
cache, and latency budgets in the budget search. No test asserts a timing."""
import dataclasses
import json

import numpy as np
import pytest

from yolocompress.compress import latency_table as lt
from yolocompress.compress.graph import analyze
from yolocompress.compress.prune import find_percents_for_budget, pruned_cost
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.shapes import layer_io

from conftest import TINY_CFG, cfg_path


def test_conv_entry_interpolates_bilinearly_and_extends_linearly():
    e = lt.ConvEntry(ins=[2, 4], outs=[4, 8], ms=[[1.0, 2.0], [3.0, 4.0]])
    assert e.predict(2, 4) == 1.0 and e.predict(4, 8) == 4.0
    assert e.predict(3, 6) == pytest.approx(2.5)           # the mean of the four corners
    assert e.predict(3, 4) == pytest.approx(2.0)
    assert e.predict(6, 8) == pytest.approx(6.0)           # past the grid: linear
    assert e.predict(1, 4) == 0.0                           # extrapolated below 0: clipped
    assert lt.ConvEntry([3], [2, 4], [[1.0, 3.0]]).predict(3, 3) == pytest.approx(2.0)


def test_grid_is_shares_of_the_full_count():
    assert lt._grid(64) == [16, 32, 48, 64]
    assert lt._grid(3) == [1, 2, 3] and lt._grid(1) == [1]


def _linear_table(blocks, size, rest=5.0):
    """A table whose conv entries are exactly 1e-3 ms per in x out channel pair."""
    convs = {}
    for i, (b, (ins, out)) in enumerate(zip(blocks[1:], layer_io(blocks, *size))):
        if b.type == "convolutional":
            ig, og = lt._grid(ins[0].c), lt._grid(out.c)
            convs[str(i)] = lt.ConvEntry(ig, og, [[1e-3 * a * c for c in og] for a in ig])
    other = sum(out.c for b, (_, out) in zip(blocks[1:], layer_io(blocks, *size))
                if b.type not in ("convolutional", "yolo"))
    key = lt.table_key(blocks, size, "torch", 1, 1)
    return lt.LatencyTable(key, convs, other, rest, 0.0)


def test_predict_sums_convs_and_scales_the_rest_by_kept_channels():
    blocks = read_cfg(TINY_CFG)
    table = _linear_table(blocks, (64, 64))
    io = layer_io(blocks, 64, 64)
    convs = sum(1e-3 * ins[0].c * out.c for b, (ins, out) in zip(blocks[1:], io)
                if b.type == "convolutional")
    assert table.predict(blocks) == pytest.approx(convs + 5.0)
    # halve the first conv (8 -> 4 filters): its readers see 4 inputs, the route/pool rows shrink
    slim = list(blocks)
    slim[1] = dataclasses.replace(blocks[1], options={**blocks[1].options, "filters": "4"})
    sio = layer_io(slim, 64, 64)
    convs2 = sum(1e-3 * ins[0].c * out.c for b, (ins, out) in zip(slim[1:], sio)
                 if b.type == "convolutional")
    other = [sum(out.c for b, (_, out) in zip(bl[1:], x) if b.type not in ("convolutional", "yolo"))
             for bl, x in ((blocks, io), (slim, sio))]
    assert table.predict(slim) == pytest.approx(convs2 + 5.0 * other[1] / other[0])
    assert table.predict(slim) < table.predict(blocks)


def test_measure_table_times_each_conv_shape_once_on_the_grid():
    blocks = read_cfg(TINY_CFG)
    table = lt.measure_table(blocks, (32, 32), "torch", threads=1, warmup=0, iters=1)
    io = layer_io(blocks, 32, 32)
    convs = [i for i, b in enumerate(blocks[1:]) if b.type == "convolutional"]
    assert sorted(map(int, table.convs)) == convs
    for i in convs:
        e, (ins, out) = table.convs[str(i)], io[i]
        assert e.ins == lt._grid(ins[0].c) and e.outs == lt._grid(out.c)
        assert np.asarray(e.ms).shape == (len(e.ins), len(e.outs)) and np.min(e.ms) > 0
    same = [i for i in convs if (io[i][0][0].c, io[i][1].c) == (8, 8) and
            blocks[i + 1].get_int("size") == 3 and io[i][0][0].h == 16]
    assert all(table.convs[str(i)] is table.convs[str(same[0])] for i in same)
    assert table.total_ms > 0 and table.rest_ms >= 0
    sum_convs = sum(table.convs[str(i)].predict(io[i][0][0].c, io[i][1].c) for i in convs)
    assert table.predict(blocks) == pytest.approx(max(table.total_ms, sum_convs))
    with pytest.raises(YoloCompressError, match="unknown backend 'tvm'"):
        lt.measure_table(blocks, (32, 32), "tvm")


def test_onnxruntime_table_measures_and_round_trips_json():
    pytest.importorskip("onnxruntime")
    blocks = read_cfg(TINY_CFG)
    table = lt.measure_table(blocks, (32, 32), "onnxruntime", threads=1, warmup=0, iters=1)
    assert table.key["backend"] == "onnxruntime" and table.total_ms > 0
    back = lt.LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert back.predict(blocks) == pytest.approx(table.predict(blocks))


def test_cache_reuses_a_table_only_for_its_own_key(tmp_path, monkeypatch):
    blocks = read_cfg(TINY_CFG)
    calls = []

    def fake(b, size, backend, threads, batch):
        calls.append((backend, threads))
        return _linear_table(b, size)

    monkeypatch.setattr(lt, "measure_table", fake)
    a = lt.load_or_measure(blocks, (64, 64), tmp_path, "torch", 1)
    b = lt.load_or_measure(blocks, (64, 64), tmp_path, "torch", 1)
    assert calls == [("torch", 1)] and b.predict(blocks) == pytest.approx(a.predict(blocks))
    lt.load_or_measure(blocks, (64, 64), tmp_path, "torch", 2)       # other threads: measured
    assert calls == [("torch", 1), ("torch", 2)] and len(list(tmp_path.iterdir())) == 2
    path = next(tmp_path.iterdir())
    path.write_text("{not json")
    with pytest.raises(YoloCompressError, match="unreadable latency table"):
        for t in (1, 2):
            lt.load_or_measure(blocks, (64, 64), tmp_path, "torch", t)


def test_latency_budget_lands_on_the_predicted_target():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    from test_prune import _state

    sd = _state(blocks)
    table = _linear_table(blocks, (256, 256), rest=0.0)
    r = find_percents_for_budget(blocks, sd, target=("latency", 0.4), size=(256, 256),
                                 latency=table)
    assert 0.4 <= r.reduction <= 0.41
    assert r.reduction == pytest.approx(1 - pruned_cost(blocks, r.keep, "latency", latency=table)
                                        / table.predict(blocks))
    assert set(r.keep) == set(analyze(blocks).prunable)
    with pytest.raises(YoloCompressError, match="needs a latency table"):
        find_percents_for_budget(blocks, sd, target=("latency", 0.4))
