"""SwinUNETR (nnssl.architectures.swinunetr): size, the network contract, MONAI parity."""
import pytest
import torch
from conftest import require_optional

from nnssl.architectures.build import build_network
from nnssl.architectures.spec import ARCHITECTURES, count_parameters
from nnssl.architectures.swinunetr import TINY, MonaiPatchMerging, SwinUNETR, load_monai_state_dict
from nnssl.errors import NnsslError

SMALL = {"feature_size": 12, "window_size": 3}  # MONAI needs feature_size % 12 == 0


def test_parameter_count_matches_the_paper_size():
    with torch.device("meta"):
        net = SwinUNETR(1, 14)
    n = count_parameters(net)
    assert abs(n - 62.2e6) / 62.2e6 < 0.03, n
    assert n == 62_187_296  # MONAI SwinUNETR(feature_size=48, 1 -> 14 channels), parameters only


def test_contract_levels_and_cropped_decoder():
    torch.manual_seed(0)
    net = SwinUNETR(2, 3, **TINY).eval()
    x = torch.randn(1, 2, 32, 64, 32)
    with torch.no_grad():
        levels = net.encoder(x)
        assert [tuple(f.shape[1:]) for f in levels] == [
            (6, 32, 64, 32), (6, 16, 32, 16), (12, 8, 16, 8), (24, 4, 8, 4), (48, 2, 4, 2), (96, 1, 2, 1)]
        y = net(x)
        assert torch.equal(y, net.decoder(levels)) and y.shape == (1, 3, 32, 64, 32)
        # every level cropped to the same region (one bottleneck voxel along H) decodes that region
        cropped = [f[:, :, :, f.shape[3] // 2:] for f in levels]
        assert net.decoder(cropped).shape == (1, 3, 32, 32, 32)
    assert "cropped_decoder" in ARCHITECTURES.get("swinunetr").capabilities
    net.decoder.deep_supervision = True
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, list) and len(out) == 1
    assert all(".seg_layers." not in k for k in net.encoder.state_dict())
    assert [k for k in net.state_dict() if ".seg_layers." in k] == ["decoder.seg_layers.0.weight",
                                                                     "decoder.seg_layers.0.bias"]


def test_feature_map_estimate_grows_with_the_patch():
    net = SwinUNETR(1, 2, **TINY)
    small, large = net.compute_conv_feature_map_size((32, 32, 32)), net.compute_conv_feature_map_size((64, 64, 64))
    assert small > 0 and 7 < large / small < 9  # ~ voxel count (x8), attention windows fixed


def test_bad_input_and_kwargs():
    net = SwinUNETR(1, 2, **TINY)
    with pytest.raises(NnsslError, match=r"divisible by \(32, 32, 32\)"):
        net(torch.zeros(1, 1, 48, 32, 32))
    with pytest.raises(NnsslError, match="num_heads"):
        SwinUNETR(1, 2, feature_size=6, num_heads=[4, 4, 4, 4])
    with pytest.raises(NnsslError, match="attention_compat"):
        SwinUNETR(1, 2, attention_compat="timm")
    with pytest.raises(NnsslError, match="Allowed"):
        SwinUNETR(1, 2, use_v2=True)


def test_build_network_plans_multiples_of_32():
    net = build_network("swinunetr", (32, 64, 64), 1, 3, preset="tiny")
    assert net.config.feature_size == TINY["feature_size"]
    with pytest.raises(NnsslError, match="32"):
        build_network("swinunetr", (48, 64, 64), 1, 3, preset="tiny")
    with pytest.raises(NnsslError, match=r"at least \(32, 64, 64\)"):  # a one-voxel bottleneck
        build_network("swinunetr", (32, 32, 64), 1, 3, preset="tiny")


@pytest.fixture(scope="module")
def monai_swinunetr():
    """MONAI SwinUNETR (2 -> 3 channels, feature size 12) with a given window, built once per window."""
    # MONAI >= 1.5: its SwinUNETR merges patches in the order nnssl's default mode reproduces (and takes no img_size)
    monai_nets = require_optional("monai.networks.nets", min_version="1.5")
    built = {}

    def make(window):
        if window not in built:
            torch.manual_seed(0)
            built[window] = monai_nets.SwinUNETR(in_channels=2, out_channels=3, depths=(2, 2, 2, 2), feature_size=12,
                                                 window_size=window).eval()
        return built[window]
    return make


def _loaded(monai_net, window, **kwargs):
    net = SwinUNETR(2, 3, feature_size=12, window_size=window, **kwargs).eval()
    result = load_monai_state_dict(net, monai_net.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return net


def test_monai_state_dict_loads_strictly_and_outputs_match(monai_swinunetr):
    """32 x 32 x 64 with window 3: every stage needs padding (16, 16, 32 tokens ... 2, 2, 4) and the
    last one shrinks the window on two axes. The "monai" mode reproduces MONAI; nnssl's masking default
    differs. (A 32^3 input would leave a one-voxel bottleneck, which instance norm refuses.)"""
    monai_net = monai_swinunetr(3)
    x = torch.randn(1, 2, 32, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = monai_net(x)
        got = _loaded(monai_net, 3, attention_compat="monai")(x)
        default = _loaded(monai_net, 3)(x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (default - expected).abs().max() > 1e-3  # padded keys masked: a padding-independent output


def test_monai_parity_without_padding_needs_no_compat_mode(monai_swinunetr):
    """32 x 32 x 64 with window 2: 16 ... 2 tokens per axis, no padding and no shrunk window, so nnssl's
    default equals MONAI (the two modes differ only where they should)."""
    monai_net = monai_swinunetr(2)
    x = torch.randn(1, 2, 32, 32, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(_loaded(monai_net, 2)(x), monai_net(x), atol=1e-5)


def test_a_monai_index_of_another_window_is_refused(monai_swinunetr):
    net = SwinUNETR(2, 3, feature_size=12, window_size=5)
    with pytest.raises(NnsslError, match="window"):
        load_monai_state_dict(net, monai_swinunetr(3).state_dict())


# MONAI <= 1.4's "merging" order, written from MONAI PR #8285 (released in 1.5): its x0..x7 offsets.
MONAI_1_4_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))


def _as_monai_1_4(monai_net):
    """A copy of a MONAI >= 1.5 SwinUNETR whose patch mergings concatenate in MONAI <= 1.4's order."""
    import copy
    legacy = copy.deepcopy(monai_net)
    for i in range(1, 5):
        merge = getattr(legacy.swinViT, f"layers{i}")[0].downsample

        def forward(x, merge=merge):
            x = torch.cat([x[:, a::2, b::2, c::2] for a, b, c in MONAI_1_4_OFFSETS], -1)
            return merge.reduction(merge.norm(x))
        merge.forward = forward
    return legacy


def test_legacy_patch_merging_reproduces_monai_1_4_and_the_default_monai_1_5(monai_swinunetr):
    import monai
    assert tuple(int(v) for v in monai.__version__.split(".")[:2]) >= (1, 5), "the parity tests need monai>=1.5"
    monai_net = monai_swinunetr(2)
    x = torch.randn(1, 2, 32, 32, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        new, old = monai_net(x), _as_monai_1_4(monai_net)(x)
        default, legacy = _loaded(monai_net, 2)(x), _loaded(monai_net, 2, legacy_patch_merging=True)(x)
    assert torch.allclose(default, new, atol=1e-5) and torch.allclose(legacy, old, atol=1e-5)
    assert (new - old).abs().max() > 0.05 * new.std()  # the two MONAI versions compute something else


def test_legacy_merging_never_reads_two_of_the_eight_neighbours():
    """MONAI <= 1.4 reads (0, 1, 0) and (0, 0, 1) twice and (1, 1, 0), (0, 1, 1) never."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, 3)
    bumped = x.clone()
    bumped[:, 1::2, 1::2, 0::2] += 1.0  # the (1, 1, 0) neighbours
    bumped[:, 0::2, 1::2, 1::2] += 1.0  # the (0, 1, 1) neighbours
    for legacy, unchanged in ((True, True), (False, False)):
        merge = MonaiPatchMerging(3, legacy=legacy)
        with torch.no_grad():
            assert torch.allclose(merge(x), merge(bumped)) == unchanged


def test_set_drop_rate_equals_building_with_that_drop_rate():
    """Same weights, same seed, training mode: identical outputs, so exactly drop_rate's dropouts changed
    (a network that also drops attention weights differs)."""
    torch.manual_seed(0)
    built = SwinUNETR(1, 2, **TINY, drop_rate=0.3)
    later, with_attn = SwinUNETR(1, 2, **TINY), SwinUNETR(1, 2, **TINY, drop_rate=0.3, attn_drop_rate=0.3)
    for net in (later, with_attn):
        net.load_state_dict(built.state_dict())
    later.set_drop_rate(0.3)
    x = torch.randn(1, 1, 32, 64, 64)
    outputs = []
    with torch.no_grad():
        for net in (built, later, with_attn):
            torch.manual_seed(1)
            outputs.append(net.train()(x))
    assert torch.equal(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])
