"""QT-UNet (paper 001): windows, cross-attention, merge/expand, sizes, interface, planner, trainer."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from nnssl.architectures import ARCHITECTURES
from nnssl.architectures.blocks.swin import PatchMerging, window_apply
from nnssl.architectures.blocks.swin_cross import PatchExpand, QTDecoderBlock, WindowCrossAttention
from nnssl.architectures.qt_unet import TINY, QTUNet, QTUNetConfig
from nnssl.architectures.spec import count_parameters
from nnssl.errors import NnsslError
from nnssl.planning.qt_unet import QTUNetBPlanner, QTUNetSPlanner, QTUNetTPlanner
from nnssl.training.trainer_registry import TRAINERS
from nnssl.training.trainers.qt_unet import nnsslTrainer_QTUNet, nnsslTrainer_QTUNet_DiceCE


def tiny_net(num_classes=3, **kw) -> QTUNet:
    torch.manual_seed(0)
    return QTUNet(1, num_classes, **{**TINY, **kw})


# --- windows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size,window,shift", [((6, 4, 5), (4, 4, 4), (2, 2, 2)), ((4, 4, 4), (2, 2, 2), (1, 1, 1))])
def test_window_apply_identity_round_trips_through_padding_and_shift(size, window, shift):
    x = torch.randn(2, *size, 3)
    ctx = torch.randn(2, *size, 3)
    assert torch.equal(window_apply(lambda w, c, win, mask: w, x, window, shift), x)
    # the context is cut into the very same windows: returning it gives the context back
    assert torch.equal(window_apply(lambda w, c, win, mask: c, x, window, shift, context=ctx), ctx)


def _cell(p: int, n: int, w: int, s: int) -> int:
    """Window index of position p along an axis of n tokens: shifted windows are the window grid
    offset by s (positions < s form their own cell); an axis no longer than w is one window."""
    if n <= w:
        return 0
    return (p - s) // w


def test_cross_attention_sees_only_its_shifted_window_brute_force():
    """Perturb one encoder token at a time: exactly the decoder tokens in the same shifted window
    (first principles: cells of the window grid offset by the shift) change."""
    torch.manual_seed(0)
    size, window, shift = (6, 4, 5), (4, 4, 4), (2, 2, 2)  # axis 1 shrinks (no shift); axes 0, 2 pad
    attn = WindowCrossAttention(4, 2, window)
    x, enc = torch.randn(1, *size, 4), torch.randn(1, *size, 4)

    def run(e):
        return window_apply(lambda w, c, win, mask: attn(w, c, win, mask), x, window, shift, context=e)

    base = run(enc)
    positions = list(itertools.product(*[range(n) for n in size]))
    for key in positions:
        e = enc.clone()
        e[(0, *key)] += 10.0
        changed = (run(e) - base).abs().amax(-1)[0] > 1e-6
        cells = lambda p: tuple(_cell(a, n, w, s) for a, n, w, s in zip(p, size, window, shift))  # noqa: E731
        expected = torch.zeros(size, dtype=torch.bool)
        for q in positions:
            expected[q] = cells(q) == cells(key)
        assert torch.equal(changed, expected), key


def test_cross_attention_queries_from_decoder_keys_values_from_encoder():
    """One window, no mask: out = proj(softmax(q(x) k(enc)^T / sqrt(d) + bias) v(enc)) by hand."""
    torch.manual_seed(0)
    attn = WindowCrossAttention(6, 2, (2, 2, 2))
    x, enc = torch.randn(1, 8, 6), torch.randn(1, 8, 6)
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = x @ w[:6].T + b[:6], enc @ w[6:12].T + b[6:12], enc @ w[12:].T + b[12:]
    heads = []
    for h in range(2):
        sl = slice(3 * h, 3 * h + 3)
        logits = q[0, :, sl] @ k[0, :, sl].T / np.sqrt(3) + attn.position_bias((2, 2, 2))[h]
        heads.append(torch.softmax(logits, -1) @ v[0, :, sl])
    expected = attn.proj(torch.cat(heads, -1))
    assert torch.allclose(attn(x, enc, (2, 2, 2), None)[0], expected, atol=1e-6)


def test_gradient_reaches_the_encoder_skip_through_keys_values():
    """With the skip half of the concat projection zeroed, the only way from e_0 to the output is
    the cross-attention's keys/values: e_0 gets a gradient; zeroing the K/V rows too cuts it."""
    net = tiny_net()
    x = torch.randn(2, 1, 32, 32, 32)
    c0 = net.config.embed_dim
    with torch.no_grad():
        net.decoder.concat_back[0].weight[:, c0:] = 0  # input = cat(expanded, skip)

    def grad_of_e0():
        feats = [f.detach().requires_grad_(True) for f in net.encoder(x)]
        net.decoder(feats).square().sum().backward()
        return feats[0].grad

    assert grad_of_e0().abs().sum() > 0
    with torch.no_grad():
        for block in net.decoder.stages[0]:
            block.cross_attn.qkv.weight[c0:] = 0
            block.cross_attn.qkv.bias[c0:] = 0
    assert torch.count_nonzero(grad_of_e0()) == 0


def test_decoder_block_is_post_norm():
    """Post-norm: every block output is layer-normalised (per token mean 0, var 1 with unit LN)."""
    torch.manual_seed(0)
    block = QTDecoderBlock(8, 2, (2, 2, 2), (1, 1, 1))
    out = block(torch.randn(1, 4, 4, 4, 8) * 5 + 3, torch.randn(1, 4, 4, 4, 8))
    assert torch.allclose(out.mean(-1), torch.zeros(1, 4, 4, 4), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(1, 4, 4, 4), atol=1e-3)


# --- merge / expand ------------------------------------------------------------------------------
def test_patch_merge_and_expand_shapes_and_inverse_layout():
    x = torch.arange(2 * 4 * 6 * 8 * 3, dtype=torch.float32).reshape(2, 4, 6, 8, 3)
    merge = PatchMerging(3)
    captured = {}
    merge.norm.register_forward_hook(lambda m, inp, out: captured.setdefault("concat", inp[0]))
    assert merge(x).shape == (2, 2, 3, 4, 6)  # 2x2x2 -> 8C -> 2C
    concat = captured["concat"]
    assert concat.shape == (2, 2, 3, 4, 24)
    # token (0, 0, 0) holds the 8 neighbours in raster order of their (d, h, w) offsets
    expected = torch.cat([x[0, d, h, w] for d, h, w in itertools.product(range(2), repeat=3)])
    assert torch.equal(concat[0, 0, 0, 0], expected)
    # expansion's rearrangement is the exact inverse of the merge's concatenation
    assert torch.equal(PatchExpand(24, 3, 2).rearrange(concat), x)
    # Linear C -> 4C, then 2x2x2 tokens of C/2 (QT-UNet), and the final x4 (C -> 64C -> tokens of C)
    assert PatchExpand(16, 8, 2)(torch.randn(1, 2, 3, 4, 16)).shape == (1, 4, 6, 8, 8)
    assert PatchExpand(16, 8, 2).expand.weight.shape == (64, 16)  # C -> 4C
    assert PatchExpand(8, 8, 4)(torch.randn(1, 1, 2, 1, 8)).shape == (1, 4, 8, 4, 8)


# --- sizes and interface ----------------------------------------------------------------------
@pytest.mark.parametrize("dim,paper", [(48, 6.6e6), (72, 14.5e6), (96, 25.5e6)])
def test_parameter_counts_match_the_paper(dim, paper):
    """1 channel, 14 classes (BTCV); the count does not depend on the patch (bias tables are
    sized for the configured 7^3 window), so 96^3 needs no forward."""
    n = count_parameters(QTUNet(1, 14, embed_dim=dim))
    assert abs(n - paper) / paper < 0.03, n


def test_encoder_levels_decoder_and_forward():
    net = tiny_net(num_classes=3)
    x = torch.randn(2, 1, 32, 64, 32)
    feats = net.encoder(x)
    c = net.config.embed_dim
    assert [tuple(f.shape) for f in feats] == [(2, c, 8, 16, 8), (2, 2 * c, 4, 8, 4), (2, 4 * c, 2, 4, 2),
                                               (2, 8 * c, 1, 2, 1)]
    net.eval()
    with torch.no_grad():
        y = net(x)
        assert y.shape == (2, 3, 32, 64, 32)
        assert torch.equal(net.decoder(net.encoder(x)), y)
        net.decoder.deep_supervision = True
        ds = net(x)
    assert isinstance(ds, list) and len(ds) == 1 and torch.equal(ds[0], y)
    assert isinstance(net.decoder.seg_layers[0], nn.Conv3d) and net.decoder.seg_layers[0].out_channels == 3


def _kv_seen_by_each_decoder_stage(net, x):
    """{stage i: the ``enc`` tensor its first decoder block received} for one forward of x."""
    seen, hooks = {}, []
    for i, stage in enumerate(net.decoder.stages):
        hooks.append(stage[0].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[1])))
    with torch.no_grad():
        y = net(x)
    for h in hooks:
        h.remove()
    return seen, y


def test_cross_attention_keys_values_switch_between_stage_output_and_input():
    """Paper (default): K/V of decoder stage i from e_i; the authors' code: the tokens entering encoder stage i,
    rebuilt here by hand from the encoder's modules (patch embedding + norm; then merge of the previous stage)."""
    x = torch.randn(1, 1, 32, 32, 32)
    paper = tiny_net().eval()
    authors = tiny_net(cross_kv_source="encoder_input").eval()
    authors.load_state_dict(paper.state_dict())  # same parameters: only the wiring differs
    with torch.no_grad():
        feats = paper.encoder(x)
        enc = paper.encoder
        t = enc.embed_norm(enc.patch_embed(x).permute(0, 2, 3, 4, 1))
        inputs = []
        for i in range(len(enc.stages) - 1):
            if i > 0:
                t = enc.merges[i - 1](t)
            inputs.append(t)
            for block in enc.stages[i]:
                t = block(t)
    seen_paper, y_paper = _kv_seen_by_each_decoder_stage(paper, x)
    seen_authors, y_authors = _kv_seen_by_each_decoder_stage(authors, x)
    for i in range(3):
        assert torch.equal(seen_paper[i], feats[i].permute(0, 2, 3, 4, 1))
        assert torch.allclose(seen_authors[i], inputs[i], atol=1e-6)
        assert not torch.allclose(seen_authors[i], seen_paper[i], atol=1e-3)
    assert not torch.allclose(y_paper, y_authors, atol=1e-4)
    assert QTUNetConfig().cross_kv_source == "encoder_output"
    assert QTUNetTPlanner.without_dataset().arch_kwargs((32, 32, 32), (1, 1, 1))["cross_kv_source"] == "encoder_output"
    with pytest.raises(NnsslError, match="cross_kv_source"):
        QTUNetConfig(cross_kv_source="input")


def test_patch_not_divisible_by_32_names_the_nearest_valid_sizes():
    net = tiny_net()
    with pytest.raises(NnsslError, match=r"axis 1: 40 -> 32 or 64") as e:
        net(torch.zeros(1, 1, 32, 40, 32))
    assert "axis 0" not in str(e.value)
    with pytest.raises(NnsslError, match=r"axis 2: 16 -> 32 or 32"):
        net(torch.zeros(1, 1, 32, 32, 16))


def test_bad_arch_kwargs_are_refused():
    with pytest.raises(NnsslError, match="heads"):
        QTUNetConfig(heads=(3, 6, 12))
    with pytest.raises(NnsslError, match="Unknown QT-UNet arch_kwargs"):
        QTUNet(1, 2, embed=96)


def test_window_shrinks_without_shift_on_small_grids():
    """At 96^3 the stages see 24, 12, 6, 3 tokens: windows 7, 7, 6, 3, shifted only where 7 < size."""
    net = QTUNet(1, 2, embed_dim=48)
    from nnssl.architectures.blocks.swin import effective_window
    sizes = net.encoder.grid_sizes((96, 96, 96))
    assert sizes == [(24,) * 3, (12,) * 3, (6,) * 3, (3,) * 3]
    got = [effective_window(s, net.config.window_size, net.config.shift_size) for s in sizes]
    assert got == [((7,) * 3, (3,) * 3), ((7,) * 3, (3,) * 3), ((6,) * 3, (0,) * 3), ((3,) * 3, (0,) * 3)]


def test_feature_map_estimate_grows_with_the_patch_and_b_at_96_fits_the_default_budget():
    net = QTUNet(1, 14, embed_dim=96)
    small, big = (net.compute_conv_feature_map_size(p) for p in ((64, 64, 64), (96, 96, 96)))
    assert 0 < small < big
    # nnU-Net's 3d reference budget at 8 GB (its planner's UNet_reference_val_3d) holds the paper's patch
    assert big < 560_000_000


# --- registration, planner, trainer ------------------------------------------------------------
def test_planners_divisor_and_variant_kwargs():
    for name, planner, dim in (("qt_unet_t", QTUNetTPlanner, 48), ("qt_unet_s", QTUNetSPlanner, 72),
                               ("qt_unet_b", QTUNetBPlanner, 96)):
        spec = ARCHITECTURES.get(name)
        assert spec.planner_class() is planner and spec.trainer == "nnsslTrainer_QTUNet"
        p = object.__new__(planner)  # the kwargs need no dataset
        p.arch_overrides = {}
        assert p.patch_divisor((1.0, 1.0, 1.0)) == (32, 32, 32)
        kwargs = p.arch_kwargs((96, 96, 96), (1.0, 1.0, 1.0))
        assert kwargs["embed_dim"] == dim and kwargs["window_size"] == [7, 7, 7]
        assert QTUNet(1, 2, **kwargs).config == QTUNetConfig(embed_dim=dim)
        p.arch_overrides = spec.presets["tiny"]["arch_overrides"]
        assert p.arch_kwargs((32, 32, 32), (1.0, 1.0, 1.0))["embed_dim"] == TINY["embed_dim"]


def test_trainers_adam_cosine_and_losses():
    assert TRAINERS.get("nnsslTrainer_QTUNet") is nnsslTrainer_QTUNet
    fake = SimpleNamespace(network=nn.Linear(2, 2), initial_lr=4e-4, weight_decay=0.0, num_epochs=100,
                           print_to_log_file=lambda *a: None)
    opt, sched = nnsslTrainer_QTUNet.configure_optimizers(fake)
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    lrs = {}
    for epoch in (0, 50, 99):
        sched.step(epoch)
        lrs[epoch] = opt.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(4e-4) and lrs[50] == pytest.approx(2e-4)
    assert lrs[99] == pytest.approx(4e-4 * 0.5 * (1 + np.cos(np.pi * 99 / 100)))
    from nnunetv2.training.nnUNetTrainer.variants.loss.nnUNetTrainerDiceLoss import nnUNetTrainerDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    assert nnsslTrainer_QTUNet._build_loss is nnUNetTrainerDiceLoss._build_loss  # Dice only (paper)
    assert nnsslTrainer_QTUNet_DiceCE._build_loss is nnUNetTrainer._build_loss  # Dice + CE (option)
