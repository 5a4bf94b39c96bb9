"""cfg text <-> blocks: round trips, published-file style, and one-line errors with file:line."""
import pytest

from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg, read_cfg, resolve_sources, set_classes, write_cfg

from conftest import PUBLISHED_CFGS, TINY_CFG, cfg_error


@pytest.mark.parametrize("path", PUBLISHED_CFGS + [TINY_CFG], ids=lambda p: p.name)
def test_round_trip_is_identical(path):
    blocks = read_cfg(path)
    text = write_cfg(blocks)
    again = parse_cfg(text)
    assert again == blocks
    assert write_cfg(again) == text


def test_published_style_comments_spaces_and_relative_absolute_routes():
    text = """
# comment line
[net]
# Testing
#batch=1
width = 64
height=64   
channels=3

[convolutional]
batch_normalize=1
filters = 4
size=3
stride=1
pad=1
activation=leaky

[convolutional]
filters=4
size=1
activation=linear

[route]
layers = -1, 0

[route]
layers=1
"""
    blocks = parse_cfg(text)
    assert [b.type for b in blocks] == ["net", "convolutional", "convolutional", "route", "route"]
    assert blocks[0].get_int("width") == 64 and blocks[0].get_int("height") == 64
    assert blocks[1].options["filters"] == "4"
    assert resolve_sources(blocks, 2) == [1, 0]
    assert resolve_sources(blocks, 3) == [1]




NET = "[net]\nwidth=32\nheight=32\n"


def test_unknown_section_names_file_and_line(tmp_path):
    msg = cfg_error(NET + "\n[blur]\nsize=3\n", tmp_path)
    assert "bad.cfg:5" in msg and "unknown section [blur]" in msg


def test_unsupported_darknet_section_says_so(tmp_path):
    msg = cfg_error(NET + "\n[crop]\nsize=3\n", tmp_path)
    assert "bad.cfg:5" in msg and "[crop] (classification layers) is not supported" in msg


def test_missing_required_key(tmp_path):
    msg = cfg_error(NET + "[convolutional]\nsize=3\n", tmp_path)
    assert "bad.cfg:4" in msg and "missing 'filters'" in msg


def test_route_outside_network(tmp_path):
    msg = cfg_error(NET + "[convolutional]\nfilters=2\nsize=1\n[route]\nlayers=999\n", tmp_path)
    assert "bad.cfg:8" in msg and "layer 999" in msg


def test_route_forward_reference_and_shortcut_below_zero(tmp_path):
    assert "layer 1" in cfg_error(NET + "[convolutional]\nfilters=2\nsize=1\n[route]\nlayers=1\n",
                               tmp_path)
    assert "layer -2" in cfg_error(NET + "[convolutional]\nfilters=2\nsize=1\n[shortcut]\nfrom=-3\n",
                                tmp_path)


def test_non_numeric_value(tmp_path):
    msg = cfg_error(NET + "[convolutional]\nfilters=two\nsize=1\n", tmp_path)
    assert "bad.cfg:5" in msg and "'filters=two' is not an integer" in msg


def test_non_numeric_anchor_list(tmp_path):
    msg = cfg_error(NET + "[convolutional]\nfilters=2\nsize=1\n[yolo]\nanchors=1,x\n", tmp_path)
    assert "bad.cfg:8" in msg and "list of numbers" in msg


def test_option_without_equals_and_missing_net(tmp_path):
    assert "expected 'key=value'" in cfg_error(NET + "[convolutional]\nfilters\n", tmp_path)
    assert "start with a [net]" in cfg_error("[convolutional]\nfilters=2\nsize=1\n", tmp_path)


def test_missing_file():
    with pytest.raises(YoloCompressError, match="cannot read cfg"):
        read_cfg("/nonexistent/x.cfg")


def test_set_classes_rewrites_yolo_and_detection_filters():
    blocks = set_classes(read_cfg(TINY_CFG), 7)
    yolos = [i for i, b in enumerate(blocks) if b.type == "yolo"]
    for i in yolos:
        assert blocks[i].get_int("classes") == 7
        assert blocks[i - 1].get_int("filters") == (7 + 5) * 3
    # the original is untouched
    assert read_cfg(TINY_CFG)[yolos[0]].get_int("classes") == 2
    with pytest.raises(YoloCompressError):
        set_classes(blocks, 0)
