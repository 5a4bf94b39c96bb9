"""models.kinds, the one table of layer kinds: options and their errors, the kinds the YOLOv3/v4/v7
cfgs use (miniatures under tests/fixtures/cfg/mini), and what each kind means for shapes, costs,
modules, .weights, the channel graph and pruning."""
import numpy as np
import pytest
import torch

from yolocompress.cli import main
from yolocompress.compress.graph import analyze, propagate_keep
from yolocompress.compress.prune import masked_model_state, prune
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg, read_cfg, write_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.kinds import KINDS, UNSUPPORTED
from yolocompress.models.layers import ACTIVATIONS
from yolocompress.models.profile import layer_shapes, profile_blocks
from yolocompress.models.roles import describe_layers
from yolocompress.models.weights import load_darknet_weights, save_darknet_weights

from conftest import MINI_CFGS, cfg_error
from test_imports import PACKAGE, cycles, import_graph

MINI = {p.stem: p for p in MINI_CFGS}




NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"      # lines 1-4
CONV = "[convolutional]\nfilters=4\nsize=3\n"           # lines 5-7 after NET


# ---- bad values: one line naming the file and the line ----------------------------------------

@pytest.mark.parametrize("text, line, problem", [
    (NET + CONV + "stride=0\n", 8, "[convolutional] stride=0 must be in 1..64"),
    (NET + CONV + "[upsample]\nstride=0\n", 9, "[upsample] stride=0 must be in 1..64"),
    (NET + "[maxpool]\nsize=0\nstride=2\n", 6, "[maxpool] size=0 must be in 1..1024"),
    (NET + "[maxpool]\nstride=0\n", 6, "[maxpool] stride=0 must be in 1..1024"),
    (NET.replace("channels=3", "channels=0") + CONV, 4, "[net] channels=0 must be in 1..1024"),
    (NET.replace("width=32", "width=100000") + CONV, 2, "[net] width=100000 must be in 1..8192"),
    (NET.replace("height=32", "height=-32") + CONV, 3, "[net] height=-32 must be in 1..8192"),
    (NET + CONV + "activation=gelux\n", 8, "[convolutional] activation=gelux is not one of linear"),
    (NET + CONV + "xnor=1\n", 8, "unknown or unsupported option 'xnor' in [convolutional]"),
    (NET + CONV + "dilation=2\n", 8, "dilation > 1 is not supported"),
    (NET + CONV + "[shortcut]\nfrom=-1\nweights_type=per_channel\n", 10,
     "[shortcut] weights_type=per_channel is not one of none"),
    (NET + CONV + "[route]\nlayers=-1\ngroups=0\n", 10, "[route] groups=0 must be >= 1"),
    (NET + CONV + "[route]\nlayers=-1\ngroups=2\ngroup_id=2\n", 11,
     "[route] group_id=2 must be below groups=2"),
    (NET + "mosaic=2\n" + CONV, 5, "[net] mosaic=2 must be in 0..1"),
    (NET + CONV + "[yolo]\nanchors=1,1\nembedding_layer=-2\n", 10,
     "unknown or unsupported option 'embedding_layer' in [yolo]"),
    (NET + CONV + CONV + "[sam]\nfrom=-2,-1\n", 12, "[sam] takes at most 1 layer(s) in 'from'"),
])
def test_bad_option_values_are_one_line_with_file_and_line(tmp_path, text, line, problem):
    msg = cfg_error(text, tmp_path)
    assert msg.startswith(f"{tmp_path / 'bad.cfg'}:{line}: ") and problem in msg


def test_unknown_net_options_are_ignored_as_darknet_does(tmp_path):
    p = tmp_path / "net.cfg"
    p.write_text(NET + "mosaic_kernel=1\nnew_training_knob=0.5\n" + CONV)
    blocks = read_cfg(p)
    assert blocks[0].options["mosaic_kernel"] == "1" and blocks[1].type == "convolutional"


def test_cli_reports_a_bad_cfg_value_as_one_error_line_and_status_2(tmp_path, capsys):
    p = tmp_path / "bad.cfg"
    p.write_text(NET + CONV + "stride=0\n[yolo]\nanchors=1,1\n")
    assert main(["info", str(p)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {p}:8: [convolutional] stride=0 must be in 1..64\n"


def test_unsupported_kinds_are_named_and_differ_from_unknown_ones(tmp_path):
    for kind in ("dropout", "region", "reorg", "implicit", "contrastive"):
        msg = cfg_error(NET + f"[{kind}]\n", tmp_path)
        assert f"bad.cfg:5: [{kind}] ({UNSUPPORTED[kind]} layers) is not supported" in msg
    assert "unknown section [pool]" in cfg_error(NET + "[pool]\n", tmp_path)
    assert not set(UNSUPPORTED) & set(KINDS)


def test_shortcut_over_different_sizes_is_an_error(tmp_path):
    text = NET + "[convolutional]\nfilters=4\nsize=1\n" + \
        "[convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\n[shortcut]\nfrom=-2\n"
    with pytest.raises(YoloCompressError, match="the sizes must match"):
        layer_shapes(parse_cfg(text, source="x.cfg"))


def test_every_kind_has_a_distinct_short_name_and_a_module():
    shorts = [k.short for k in KINDS.values()]
    assert len(set(shorts)) == len(shorts)
    assert {"convolutional", "route", "shortcut", "maxpool", "avgpool", "upsample", "sam",
            "scale_channels", "yolo"} == set(KINDS)


# ---- the miniatures: round trip, shapes, costs by hand, forward, weights ---------------------

# (params, Darknet FLOPs) summed by hand per layer, see the comments in each test below
HAND = {
    # conv0 3->8 3x3 s2 @16x16: 216 w + 16 BN, 2*216*256; conv1/conv3 8->4 1x1: 32 + 8, 2*32*256;
    # conv4-7 4->4 3x3: 144 + 8, 2*144*256; conv9 24->16: 384 + 32, 2*384*256; maxpool 2x2 @8x8:
    # 4*16*64; SPP maxpool 5x5: 25*16*64; detect 48->12 + bias: 588, 2*576*256
    "mini-yolov7": (232 + 40 + 40 + 4 * 152 + 416 + 588,
                    110592 + 2 * 16384 + 4 * 73728 + 196608 + 4096 + 25600 + 294912),
    # convs 232, 1184, 2336, 2336, 144 (8x8), detect 108; route; conv 144; conv 1184 @16x16;
    # detect 204; maxpools 8192, 4096, 4096; shortcuts = output size: 16*64, 8*256, 16*256
    "mini-yolov3-tiny-prn": (232 + 1184 + 2336 + 2336 + 144 + 108 + 144 + 1184 + 204,
                             442368 + 589824 + 2 * 294912 + 16384 + 12288 + 16384 + 589824
                             + 98304 + 8192 + 4096 + 4096 + 1024 + 2048 + 4096),
    # convs 232, 80, 592 @16x16; 40, 40 @1x1; 80 @16x16; detect 24->6 + bias 150; sam, avgpool,
    # scale_channels, route and yolo cost nothing
    "mini-yolov4-sam": (232 + 80 + 592 + 40 + 40 + 80 + 150,
                        110592 + 32768 + 294912 + 64 + 64 + 32768 + 73728),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_miniature_round_trips_and_costs_what_darknet_counts(name):
    blocks = read_cfg(MINI[name])
    assert parse_cfg(write_cfg(blocks)) == blocks
    rows = profile_blocks(blocks)
    assert (sum(r.params for r in rows), sum(r.flops for r in rows)) == HAND[name]
    model = Darknet(blocks)
    assert sum(p.numel() for p in model.parameters()) == HAND[name][0]


@pytest.mark.parametrize("name", sorted(HAND))
def test_miniature_forward_shapes_equal_layer_shapes(name):
    blocks = read_cfg(MINI[name])
    model = Darknet(blocks).eval()
    names = [i.name for i in describe_layers(blocks)]
    with torch.no_grad():
        heads, feats = model(torch.randn(2, 3, 32, 32), features=names)
    for n, s in zip(names, layer_shapes(blocks)):
        assert tuple(feats[n].shape) == (2, s.c, s.h, s.w), n
    assert len(heads) == sum(b.type == "yolo" for b in blocks)


@pytest.mark.parametrize("name", sorted(HAND))
def test_miniature_weights_round_trip_bit_exactly(name, tmp_path):
    blocks = read_cfg(MINI[name])
    a, b = Darknet(blocks), Darknet(blocks)
    with torch.no_grad():
        for p in a.state_dict().values():
            if p.dtype.is_floating_point:
                p.copy_(torch.rand_like(p) + 0.1)
    save_darknet_weights(a, tmp_path / "a.weights")
    report = load_darknet_weights(b, tmp_path / "a.weights")
    assert report.complete
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if sa[k].dtype.is_floating_point)
    save_darknet_weights(b, tmp_path / "b.weights")
    assert (tmp_path / "a.weights").read_bytes() == (tmp_path / "b.weights").read_bytes()


# ---- module semantics --------------------------------------------------------------------------

def _feats(name, names, seed=0):
    blocks = read_cfg(MINI[name])
    model = Darknet(blocks).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x, features=names)[1]


def test_route_of_six_layers_concatenates_in_cfg_order():
    names = ["conv1", "conv3", "conv4", "conv5", "conv6", "conv7", "route8", "route14", "conv9",
             "upsample13"]
    f = _feats("mini-yolov7", names)
    # layers = -1,-2,-3,-4,-5,-7 from layer 8: 7, 6, 5, 4, 3, 1
    want = torch.cat([f[n] for n in ("conv7", "conv6", "conv5", "conv4", "conv3", "conv1")], 1)
    assert torch.equal(f["route8"], want)
    assert torch.equal(f["route14"], torch.cat([f["upsample13"], f["conv9"]], 1))


def test_shortcut_adds_only_the_common_channels_and_keeps_the_previous_count():
    f = _feats("mini-yolov3-tiny-prn", ["conv2", "upsample13", "shortcut14", "conv15",
                                        "shortcut16"])
    leaky = ACTIVATIONS["leaky"]()
    # 14: previous (upsample13, 8 ch) + the first 8 of conv2's 16 channels
    assert torch.allclose(f["shortcut14"], leaky(f["upsample13"] + f["conv2"][:, :8]))
    # 16: previous (conv15, 16 ch) + upsample13's 8 channels on channels 0..7 only
    want = torch.cat([f["conv15"][:, :8] + f["upsample13"], f["conv15"][:, 8:]], 1)
    assert torch.allclose(f["shortcut16"], leaky(want))


def test_sam_scale_channels_and_avgpool_follow_darknet():
    f = _feats("mini-yolov4-sam", ["conv0", "conv1", "sam2", "conv3", "avgpool4", "conv6",
                                   "scale7"])
    assert torch.equal(f["sam2"], f["conv1"] * f["conv0"])             # previous * from
    assert torch.allclose(f["avgpool4"], f["conv3"].mean(dim=(2, 3), keepdim=True))
    # each channel of conv3 scaled by the previous layer's (1, 8, 1, 1) value
    assert torch.equal(f["scale7"], f["conv3"] * f["conv6"])
    assert f["conv6"].shape == (1, 8, 1, 1)


def test_hard_mish_and_upsample_scale_by_hand():
    x = torch.tensor([-3.0, -2.0, -1.0, -0.5, 0.0, 2.0])
    # x > 0: x; -2 < x <= 0: x^2/2 + x; else 0
    assert torch.equal(ACTIVATIONS["hard_mish"]()(x), torch.tensor([0, 0, -0.5, -0.375, 0, 2.0]))
    text = NET + "[upsample]\nstride=2\nscale=0.5\n[convolutional]\nfilters=6\nsize=1\n" \
        "activation=linear\n[yolo]\nmask=0\nanchors=1,1\nclasses=1\n"
    m = Darknet(parse_cfg(text)).eval()
    x = torch.randn(1, 3, 32, 32)
    _, f = m(x, features=["upsample0"])
    assert torch.equal(f["upsample0"], 0.5 * x.repeat_interleave(2, 2).repeat_interleave(2, 3))


# ---- channel graph and pruning of the new structures -----------------------------------------

def test_which_convs_of_the_miniatures_are_prunable():
    g = analyze(read_cfg(MINI["mini-yolov7"]))
    assert g.prunable == (0, 1, 3, 4, 5, 6, 7)
    assert g.excluded == {9: "before_spp", 15: "detection"}
    g = analyze(read_cfg(MINI["mini-yolov3-tiny-prn"]))
    assert g.prunable == (0, 4, 6, 8)
    assert g.tied_sets == (frozenset({2, 12, 15}), frozenset({4, 6}))
    # the shortcuts over 8 and 16 channels tie 2, 12 and 15 on channels 0..7 only
    assert g.excluded[2] == g.excluded[15] == "misaligned_tie"
    g = analyze(read_cfg(MINI["mini-yolov4-sam"]))
    assert g.prunable == (5, 8)
    assert g.excluded == {0: "untraced", 1: "untraced", 3: "untraced", 6: "no_bn",
                          10: "detection"}


def _random_state(blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = Darknet(blocks).state_dict()
    for k, v in sd.items():
        if k.endswith("bn.weight"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.05
        elif k.endswith(("bn.bias", "running_mean")):
            sd[k] = torch.randn(v.shape, generator=g) * 0.2
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
    return sd


def _outputs(blocks, sd, x):
    m = Darknet(blocks)
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return m.eval()(x)


def _assert_pruned_equals_masked(blocks, keep, seed=0):
    sd = _random_state(blocks, seed)
    masked = masked_model_state(blocks, sd, keep, zero_beta=True)
    new_blocks, new_sd = prune(blocks, masked, keep)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    for a, b in zip(_outputs(new_blocks, new_sd, x), _outputs(blocks, masked, x)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    return new_blocks


@pytest.mark.parametrize("name", sorted(HAND))
def test_random_keeps_of_the_prunable_convs_equal_the_masked_model(name):
    blocks = read_cfg(MINI[name])
    graph = analyze(blocks)
    rng = np.random.default_rng(3)
    for seed in range(3):
        keep = {}
        for unit in {tuple(sorted(graph.tied_with(c))) for c in graph.prunable}:
            n = blocks[unit[0] + 1].get_int("filters")
            chans = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False))
            keep.update({c: chans for c in unit})
        new_blocks = _assert_pruned_equals_masked(blocks, keep, seed)
        assert profile_blocks(new_blocks)[0].params <= profile_blocks(blocks)[0].params


def test_uneven_shortcuts_prune_right_when_the_common_channels_agree():
    blocks = read_cfg(MINI["mini-yolov3-tiny-prn"])
    # conv12 (8) is added to conv2's first 8 channels and onto conv15's first 8: those agree
    keep = {12: np.array([0, 2, 5, 7]), 2: np.array([0, 2, 5, 7, 9, 12]),
            15: np.array([0, 2, 5, 7, 8, 10, 15])}
    new_blocks = _assert_pruned_equals_masked(blocks, keep)
    assert [new_blocks[c + 1].get_int("filters") for c in (2, 12, 15)] == [6, 4, 7]
    with pytest.raises(YoloCompressError, match=r"\[shortcut\] at layer 14 adds layers 13 and 2"):
        propagate_keep(blocks, {**keep, 2: np.array([0, 2, 5, 6, 9])})


def test_layers_that_multiply_maps_refuse_a_pruned_input():
    blocks = read_cfg(MINI["mini-yolov4-sam"])
    with pytest.raises(YoloCompressError, match=r"\[sam\] at layer 2 multiplies layer 1's"):
        propagate_keep(blocks, {1: np.arange(4)})
    with pytest.raises(YoloCompressError, match=r"\[scale_channels\] at layer 7 multiplies"):
        propagate_keep(blocks, {3: np.arange(4)})


# ---- structure of the code ------------------------------------------------------------------

def test_no_import_cycles_at_all():
    """models.profile <-> models.roles was the last cycle (a lazy import in profile_summary)."""
    graph = import_graph(PACKAGE)
    assert "yolocompress.models.shapes" in graph["yolocompress.models.roles"]   # the graph is read
    assert "yolocompress.models.profile" not in graph["yolocompress.models.roles"]
    assert cycles(graph) == []
