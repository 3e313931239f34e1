"""PCT-Net: forward wiring by hand, pre-activation before every conv, Swin regularization, shapes at all
scales, encoder contract, gradients, memory estimate, parameter count, the trainer's deep supervision."""
import numpy as np
import pytest
import torch
from torch import nn

from nnssl.architectures.spec import count_parameters
from nnssl.architectures import ARCHITECTURES
from nnssl.architectures.pct_net import PCTBlock, PCTNet, required_divisor
from nnssl.errors import NnsslError


TINY = {"channels": (4, 8, 16, 16, 32), "heads": (1, 2, 2), "window_size": 4}
NO_SWIN_DROP = {"swin_dropout": 0.0, "swin_attn_dropout": 0.0, "swin_drop_path": 0.0}


# --- hand-derived parameter counts (weights + biases; BN: 2C; PReLU: one slope) -----------
def conv(cin, cout, kvol):
    return cin * cout * kvol + cout


def preact(cin, cout, kvol):
    return 2 * cin + 1 + conv(cin, cout, kvol)


def conv_block(cin, cout, kvol):
    return preact(cin, cout, kvol) + preact(cout, cout, kvol)


def swin_block(c, heads, window):
    # LN 2C, qkv 3C^2+3C, proj C^2+C, bias table (2w-1)^3 x heads, LN 2C, MLP 4C^2+4C + 4C^2+C
    return 12 * c * c + 13 * c + (2 * window - 1) ** 3 * heads


def pct_block(c, heads, window=6, depth=2):
    return conv_block(c, c, 27) + depth * swin_block(c, heads, window)


def pct_net_parameters(cin, ncls, ch=(24, 48, 128, 256, 512), heads=(4, 8, 16), window=6, k0=9, pool0=4):
    # Only the input projection is a plain conv; every other conv (downsampling, transposed,
    # fuse, 1x1 head) is BN -> PReLU -> conv (preact), as are the conv blocks' convs.
    enc = conv(cin, ch[0], k0) + conv_block(ch[0], ch[0], k0) + preact(ch[0], ch[1], 27) + conv_block(ch[1], ch[1], 27)
    enc += sum(preact(ch[i - 1], ch[i], 27) + pct_block(ch[i], heads[i - 2], window) for i in (2, 3, 4))
    dec = preact(ch[1], ch[0], pool0) + preact(2 * ch[0], ch[0], k0) + conv_block(ch[0], ch[0], k0)  # head, 2D
    dec += preact(ch[2], ch[1], 8) + preact(2 * ch[1], ch[1], 27) + conv_block(ch[1], ch[1], 27)  # head, 3D
    dec += sum(preact(ch[i + 1], ch[i], 8) + preact(2 * ch[i], ch[i], 27) + pct_block(ch[i], heads[i - 2], window)
               for i in (2, 3))
    seg = sum(preact(ch[i], ncls, 1) for i in range(4))
    return enc + dec + seg


def test_default_parameter_count_matches_the_description():
    net = PCTNet(1, 14)
    n = count_parameters(net)
    print(f"PCT-Net default (1 channel, 14 classes): {n:,} parameters ({n / 1e6:.2f} M)")
    # One 512-channel PCT block by hand: conv branch 54C^2+6C+2, two Swin blocks of
    # 12C^2+13C+1331*16 each.
    c = 512
    assert count_parameters(net.encoder.stages[2]) == 54 * c * c + 6 * c + 2 + 2 * (12 * c * c + 13 * c + 1331 * 16)
    assert n == pct_net_parameters(1, 14)
    # The paper gives no count (only "moderate model size"). By hand: the 512-channel PCT
    # block alone is ~20.5 M, both 256-channel blocks ~10 M, and the 3x3x3 convs into and out
    # of the 512 level ~8 M, so the whole net is a little over 40 M: 44.2 M.
    assert n == 44_202_346
    # iso embedding: 3x3x3 level-0 kernels and a 2x2x2 first pool / last transposed conv.
    assert count_parameters(PCTNet(1, 14, embedding="iso")) == pct_net_parameters(1, 14, k0=27, pool0=8)


def test_default_size_forward_at_small_patch():
    torch.manual_seed(0)
    net = PCTNet(1, 14, deep_supervision=False).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 16, 32, 32))  # pyramid maps 8^3 (window 6, padded), 4^3, 2^3
    assert y.shape == (1, 14, 16, 32, 32) and torch.isfinite(y).all()


def _expected_shapes(patch, embedding):
    first = (1, 2, 2) if embedding == "aniso" else (2, 2, 2)
    scales = [(1, 1, 1), first] + [tuple(f * 2 ** k for f in first) for k in (1, 2)]
    return [tuple(p // s for p, s in zip(patch, sc)) for sc in scales]


@pytest.mark.parametrize("patch,embedding,cin", [((16, 32, 32), "aniso", 1), ((8, 48, 32), "aniso", 2),
                                                 ((16, 16, 32), "iso", 1)])
def test_output_shapes_at_four_scales(patch, embedding, cin):
    torch.manual_seed(0)
    net = PCTNet(cin, 3, embedding=embedding, **TINY)
    out = net(torch.randn(2, cin, *patch))
    assert isinstance(out, list) and len(out) == 4
    assert [tuple(o.shape) for o in out] == [(2, 3, *s) for s in _expected_shapes(patch, embedding)]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    y = net(torch.randn(2, cin, *patch))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, *patch)
    assert isinstance(PCTNet(cin, 3, deep_supervision=False, embedding=embedding, **TINY)(
        torch.randn(1, cin, *patch)), torch.Tensor)


def test_encoder_features_channels_and_strides():
    net = PCTNet(1, 3, **TINY)
    enc = net.encoder
    assert enc.output_channels == [4, 8, 16, 16, 32]
    assert enc.strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    patch = (16, 32, 48)
    feats = enc(torch.randn(2, 1, *patch))
    assert len(feats) == 5
    cum = np.cumprod(np.array(enc.strides), axis=0)
    for f, ch, s in zip(feats, enc.output_channels, cum):
        assert tuple(f.shape) == (2, ch, *(p // int(k) for p, k in zip(patch, s)))
    assert count_parameters(enc) + count_parameters(net.decoder) == count_parameters(net)
    assert len(net.decoder.seg_layers) == 4
    assert [l.conv.in_channels for l in net.decoder.seg_layers] == [4, 8, 16, 16]  # BN -> PReLU -> 1x1 conv


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = PCTNet(2, 3, **TINY, **NO_SWIN_DROP).train()  # drop-path could zero a branch for the whole batch
    out = net(torch.randn(2, 2, 16, 32, 32))
    sum(o.square().mean() for o in out).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    net = PCTNet(1, 3, **TINY)
    net.train()
    net(torch.randn(2, 1, 16, 32, 32))  # move the BN running stats away from their init
    net.eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        a, b = net(x), net(x)
        single = net(x[:1])
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.allclose(a[0][:1], single[0], atol=1e-5)  # no batch coupling in eval


def _hooked_feature_map_size(net: nn.Module, patch) -> int:
    """Elements output by every conv / linear / softmax (attention map) in a forward, per sample."""
    total = [0]
    kinds = (nn.Conv3d, nn.ConvTranspose3d, nn.Linear, nn.Softmax)
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel()))
             for m in net.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        net(torch.randn(2, 1, *patch))
    for h in hooks:
        h.remove()
    return total[0] // 2


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_feature_map_size_counts_every_stored_output(deep_supervision):
    patch = (8, 48, 32)  # exercises window shrinking and padding
    net = PCTNet(1, 3, deep_supervision=deep_supervision, **TINY).eval()
    assert net.compute_conv_feature_map_size(patch) == _hooked_feature_map_size(net, patch)


def test_required_divisor_and_bad_inputs():
    assert required_divisor("aniso", 3) == (8, 16, 16)
    assert required_divisor("iso", 3) == (16, 16, 16)
    net = PCTNet(1, 3, **TINY)
    with pytest.raises(NnsslError, match="not divisible"):
        net(torch.randn(1, 1, 12, 32, 32))
    with pytest.raises(NnsslError, match="heads"):
        PCTNet(1, 3, channels=(4, 8, 16, 16, 32), heads=(1, 2))
    with pytest.raises(NnsslError, match="embedding"):
        PCTNet(1, 3, embedding="2d")
    with pytest.raises(NnsslError, match="Unknown PCT-Net arch_kwargs"):
        PCTNet(1, 3, chanels=(4, 8, 16, 16, 32))


def test_built_by_nnunet_from_json_kwargs_and_registered():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items()}  # as read from JSON
    net = get_network_from_plans("nnssl.architectures.pct_net.PCTNet", kwargs, [], 1, 5, deep_supervision=False)
    assert isinstance(net, PCTNet) and net.decoder.deep_supervision is False
    assert net.config.window_size == (4, 4, 4)
    spec = ARCHITECTURES.get("pct_net")
    assert spec.plans_name == "nnsslPCTNetPlans" and "tiny" in spec.presets


def test_pct_block_adds_conv_and_swin_branches():
    torch.manual_seed(0)
    block = PCTBlock(8, 2, (4, 4, 4), depth=2).eval()
    x = torch.randn(1, 8, 4, 8, 8)
    with torch.no_grad():
        t = x.permute(0, 2, 3, 4, 1)
        for b in block.swin:
            t = b(t)
        expected = block.conv(x) + t.permute(0, 4, 1, 2, 3)
        assert torch.allclose(block(x), expected)
    assert [b.shift for b in block.swin] == [(0, 0, 0), (2, 2, 2)]


def test_planner_embedding_choice():
    from nnssl.planning.pct_net import choose_embedding
    assert choose_embedding((3.0, 0.8, 0.8)) == "aniso"
    assert choose_embedding((1.0, 1.0, 1.0)) == "iso"
    assert choose_embedding((1.5, 0.8, 0.8)) == "iso"  # ratio 1.875 <= 2
    assert choose_embedding((0.8, 3.0, 0.8)) == "iso"  # thick axis not first: no 2D level


def test_planner_writes_buildable_plans(blob_dataset, monkeypatch):
    import json
    import os
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnssl.planning.pct_net import PCTNetPlanner
    # nnU-Net's VRAM estimate calls torch.set_num_threads(n_proc_DA), which conftest sets to 0.
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    DatasetFingerprintExtractor("Dataset001_Blobs", num_processes=1).run()
    planner = PCTNetPlanner("Dataset001_Blobs", preset="tiny")
    planner.plan_experiment()
    with open(planner.plans_file(), encoding="utf-8") as f:
        plans = json.load(f)
    assert os.path.basename(planner.plans_file()) == "nnsslPCTNetPlans.json"
    conf = plans["configurations"]["3d_fullres"]
    arch = conf["architecture"]
    assert arch["network_class_name"] == "nnssl.architectures.pct_net.PCTNet"
    kw = arch["arch_kwargs"]
    assert kw["embedding"] == "aniso"  # blobs: 3.0 mm slices, 0.8 mm in-plane
    assert kw["channels"] == [4, 8, 16, 16, 32] and kw["heads"] == [1, 2, 2]
    assert kw["dropout"] == [0.0, 0.0, 0.2, 0.2, 0.2]  # paper default kept by the preset
    patch = conf["patch_size"]
    assert all(p % d == 0 for p, d in zip(patch, (8, 16, 16)))
    net = get_network_from_plans(arch["network_class_name"], kw, arch["_kw_requires_import"], 1, 3,
                                 deep_supervision=True)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, *patch))
    assert [tuple(o.shape[2:]) for o in out] == _expected_shapes(tuple(patch), "aniso")


# --- paper fidelity: pre-activation, Swin regularization, wiring ---

def test_bn_prelu_precede_every_conv_except_the_input_projection():
    torch.manual_seed(0)
    net = PCTNet(1, 3, **TINY).eval()
    produced = []  # (output, module type, input) of every BN / PReLU call, tensors kept alive
    # (in eval mode a dropout layer hands its input on unchanged, the very same tensor)

    def record(module, inputs, output):
        produced.append((output, type(module), inputs[0]))

    def source(t):
        return next((kind, inp) for out, kind, inp in reversed(produced) if out is t)

    unchecked, checked = [], []

    def check(module, inputs):
        name = names[module]
        try:
            kind, inp = source(inputs[0])
            assert kind is nn.PReLU and source(inp)[0] is nn.BatchNorm3d
            checked.append(name)
        except (StopIteration, AssertionError):
            unchecked.append(name)

    names = {m: n for n, m in net.named_modules()}
    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, (nn.BatchNorm3d, nn.PReLU))]
    hooks += [m.register_forward_pre_hook(check) for m in net.modules() if isinstance(m, (nn.Conv3d,
                                                                                          nn.ConvTranspose3d))]
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 32, 32))
    for h in hooks:
        h.remove()
    assert unchecked == ["encoder.stem.0"]  # the projection sees the raw image
    # 9 conv blocks x 2 convs + the 16 places: 4 downsampling, 4 transposed, 4 fuse, 4 output heads
    assert len(checked) == 18 + 16
    for part in ("encoder.stem.1.conv", "encoder.down.2.conv", "decoder.up.0.conv", "decoder.fuse.3.conv",
                 "decoder.seg_layers.3.conv"):
        assert part in checked


def test_swin_branch_regularization_defaults_and_modes():
    cfg = PCTNet(1, 3, **TINY).config
    assert (cfg.swin_dropout, cfg.swin_attn_dropout, cfg.swin_drop_path) == (0.2, 0.2, 0.2)
    net = PCTNet(1, 3, **TINY, swin_dropout=0.1, swin_attn_dropout=0.3, swin_drop_path=0.4)
    blocks = [b for stage in (*net.encoder.stages, *net.decoder.blocks[2:]) for b in stage.swin]
    assert len(blocks) == 5 * 2
    for b in blocks:
        assert (b.mlp.drop.p, b.attn.proj_drop.p, b.attn.attn_drop.p, b.drop_path.p) == (0.1, 0.1, 0.3, 0.4)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 32, 32)
    block = net.encoder.stages[0]
    t = torch.randn(2, 16, 4, 8, 8)  # [B, C, D, H, W] of the first pyramid level
    block.train()
    a, b = block(t), block(t)
    assert not torch.equal(a, b)  # dropout / drop-path active in training
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x)[0], net(x)[0])
    with pytest.raises(NnsslError, match="swin_drop_path"):
        PCTNet(1, 3, swin_drop_path=1.0)
    assert cfg.swin_mask_padding and not any(
        b.mask_padding for stage in PCTNet(1, 3, **TINY, swin_mask_padding=False).encoder.stages for b in stage.swin)


def test_forward_is_the_documented_wiring():
    """Recompute the outputs from the submodules: embedding, pyramid, decoder levels, heads."""
    torch.manual_seed(0)
    net = PCTNet(1, 3, **TINY).eval()
    enc, dec = net.encoder, net.decoder
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        s0 = enc.stem_blocks[0](enc.stem[0](x))
        s1 = enc.stem_blocks[1](enc.stem[1](nn.functional.max_pool3d(s0, (1, 2, 2))))
        skips = [s0, s1]
        for i in range(3):
            skips.append(enc.stages[i](enc.down[i](nn.functional.max_pool3d(skips[-1], 2))))
        for f, s in zip(enc(x), skips):
            torch.testing.assert_close(f, s)
        y, outs = skips[4], []
        for i in (3, 2, 1, 0):
            y = dec.blocks[i](dec.fuse[i](torch.cat([dec.up[i](y), skips[i]], dim=1)))
            outs.insert(0, dec.seg_layers[i](y))
        got = net(x)
        assert len(got) == 4
        for g, o in zip(got, outs):
            torch.testing.assert_close(g, o)
        # a PCT block: conv branch + the Swin blocks in sequence on channels-last tokens
        stage, z = enc.stages[1], enc.down[1](nn.functional.max_pool3d(skips[2], 2))
        tokens = stage.swin[1](stage.swin[0](z.permute(0, 2, 3, 4, 1)))
        torch.testing.assert_close(skips[3], stage.conv(z) + tokens.permute(0, 4, 1, 2, 3))


def test_trainer_weights_all_four_deep_supervision_outputs(pretrain_env):
    from nnssl.training.finetune import build_trainer

    tr = build_trainer("Dataset001_Blobs", "3d_fullres", "all", architecture="pct_net", device="cpu").trainer
    tr.initialize()
    assert tr.loss.weight_factors == pytest.approx((8 / 15, 4 / 15, 2 / 15, 1 / 15))  # 1, 1/2, 1/4, 1/8 normalised
    g = torch.Generator().manual_seed(0)
    sizes = [(4, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)]
    outs = [torch.randn(2, 3, *s, generator=g).requires_grad_() for s in sizes]
    targets = [torch.randint(0, 3, (2, 1, *s), generator=g).float() for s in sizes]
    tr.loss(outs, targets).backward()
    assert all(o.grad.abs().sum() > 0 for o in outs)  # nnU-Net's default leaves the coarsest at weight 0
