"""order_reconstruction (LWI): slab layout from the network, the order head's grouping, the loss, the preview.

The (method, architecture) grid of tests/test_pretrain_methods.py runs it end to end on every registered
architecture, and tests/test_show_pretext.py draws its mosaic.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnssl.architectures.build import build_network
from nnssl.errors import NnsslError
from nnssl.ssl.base import compatible_architectures
from nnssl.ssl.order_reconstruction import (OrderReconstruction, OrderReconstructionConfig, SlabOrderHead,
                                            probe_level_shapes, slab_layout, slab_pool)
from nnssl.training.pretrainer import build_optimizer
from nnssl.training.schedules import schedule_from_config
from nnssl.transforms.slab_shuffle import shuffle_and_mask, shuffle_slabs

CROP = (16, 16, 16)


def tiny_unet(out_channels=1, depth_strides=(1, 2, 2)):
    """3 stages (4, 8, 16 features), BatchNorm (so a probe that trained it would show), depth strides as given."""
    return PlainConvUNet(
        input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[s, 2 if i else 1, 2 if i else 1] for i, s in enumerate(depth_strides)], n_conv_per_stage=1,
        num_classes=out_channels, n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.BatchNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False)


def configured(cfg=None, crop=CROP, **kw):
    cfg = cfg or OrderReconstructionConfig()
    return OrderReconstruction.configure(cfg, lambda: tiny_unet(**kw), crop, 1)


def test_slab_layout_by_hand():
    assert slab_layout([16, 8, 4], 16, None, "all") == (4, [0, 1, 2])  # B = bottleneck depth = D / P_dm
    assert slab_layout([16, 8, 4], 16, None, "-1") == (4, [2])  # Table VIII's "t4" only
    assert slab_layout([16, 8, 4], 16, None, "0,-1,2") == (4, [0, 2])
    assert slab_layout([16, 8, 4], 16, -2, "all") == (8, [0, 1])
    # bottleneck of depth 1: the deepest level that keeps 2 positions defines B; the bottleneck sits out
    assert slab_layout([8, 4, 2, 1], 32, None, "all") == (2, [0, 1, 2])


def test_crop_depth_without_two_slabs_is_refused_saying_what_works():
    with pytest.raises(NnsslError, match=r"B >= 2.*at least 32-fold.*>= 64"):
        slab_layout([8, 4, 2, 1], 32, -1, "all")
    with pytest.raises(NnsslError, match="not a multiple"):
        slab_layout([20, 10, 5, 3], 20, None, "all")  # 20 / 3: slabs cannot be equal
    with pytest.raises(NnsslError, match="do not line up"):
        slab_layout([12, 6, 3, 2], 12, None, "all")  # level 2 has 3 positions for 2 slabs
    with pytest.raises(NnsslError, match="do not line up"):
        slab_layout([8, 4, 2, 1], 32, None, "-1")  # a depth-1 bottleneck cannot tell 2 slabs apart
    with pytest.raises(NnsslError, match="order_levels"):
        slab_layout([16, 8, 4], 16, None, "5")
    with pytest.raises(NnsslError, match="order_levels"):
        OrderReconstructionConfig(order_levels="bottleneck")


def test_configure_derives_slabs_from_the_network():
    rng_before = torch.random.get_rng_state()
    cfg = configured()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the probe build leaves the global RNG alone
    assert (cfg.num_slabs, cfg.input_channels) == (4, 1)  # depths 16, 8, 4
    assert configured(depth_strides=(1, 2, 1)).num_slabs == 8
    with pytest.raises(NnsslError, match="num_slabs=3"):
        configured(OrderReconstructionConfig(num_slabs=3))
    # a crop whose depth the encoder reduces to 1 at the bottleneck: the paper's rule refused, the default warns
    with pytest.raises(NnsslError, match="B >= 2"):
        configured(OrderReconstructionConfig(slab_level=-1), crop=(4, 16, 16))
    with pytest.warns(UserWarning, match="take no part"):
        assert configured(crop=(4, 16, 16)).num_slabs == 2


def test_probe_does_not_train_the_network():
    net = tiny_unet()
    net.train()
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    shapes = probe_level_shapes(net, CROP, 1)
    assert shapes == [(4, 16, 16, 16), (8, 8, 8, 8), (16, 4, 4, 4)]
    assert all(m.training for m in net.modules())
    assert all(torch.equal(stats[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics untouched


def test_slab_pool_by_hand():
    # D = 4, B = 2: slab 0 = depth 0-1, slab 1 = depth 2-3; feature value = 10 * depth + h
    d = torch.arange(4.0)[:, None, None]
    h = torch.arange(3.0)[None, :, None]
    f = (10 * d + h + torch.zeros(4, 3, 2))[None, None]  # [1, 1, 4, 3, 2]
    pooled = slab_pool(f, 2)
    assert pooled.shape == (1, 2, 1)
    assert pooled.flatten().tolist() == [6.0, 26.0]  # mean h = 1; mean depth 0.5 and 2.5


def _toy_features(rng, n, b, per_slab=2, hw=None):
    """Shuffled one-hot volumes: channel c is 1 where the voxel's slab was originally slab c (slab-wise
    constant intensities), [n, b, b * per_slab, hw, hw]; returns (features, order [n, b])."""
    hw = hw or b * per_slab
    onehot = np.repeat(np.eye(b, dtype=np.float32), per_slab, axis=1)[:, :, None, None] * np.ones((1, 1, hw, hw),
                                                                                               np.float32)
    orders = np.stack([rng.permutation(b) for _ in range(n)])
    feats = np.stack([shuffle_slabs(onehot, o) for o in orders])
    return torch.from_numpy(feats), torch.from_numpy(orders)


def test_only_the_depth_grouped_head_learns_the_order():
    """The shuffle is along depth only: a head that groups along depth (nnssl) reaches 100 % on the toy features;
    grouping along another axis (the authors' code) sees the same vector at every position, so it can never
    beat 1 / B (one position of each permutation right)."""
    torch.manual_seed(0)
    b = 4
    rng = np.random.default_rng(0)
    train_x, train_y = _toy_features(rng, 32, b)
    test_x, test_y = _toy_features(rng, 16, b)
    for axis, want in ((2, 1.0), (3, 1.0 / b)):
        head = SlabOrderHead(b, b)
        opt = torch.optim.Adam(head.parameters(), lr=0.1)
        for _ in range(60):
            logits = head(train_x.transpose(2, axis))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), train_y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (head(test_x.transpose(2, axis)).argmax(-1) == test_y).float().mean().item()
        assert acc == pytest.approx(want), (axis, acc)


def make_method(cfg=None):
    torch.manual_seed(0)
    cfg = configured(cfg)
    net = tiny_unet(OrderReconstruction.network_output_channels(cfg))
    return cfg, net, OrderReconstruction(cfg, net, CROP, 1)


def test_loss_terms_by_hand():
    """Zeroed heads give uniform logits: eq. 7 = levels x B x ln B per sample; eq. 8 is the MSE against the
    shuffled *unmasked* crop; eq. 9 their weighted sum."""
    cfg, net, method = make_method(OrderReconstructionConfig(weight_rec=0.5))
    assert method.levels == [0, 1, 2] and [h.linear.in_features for h in method.heads] == [4, 8, 16]
    for head in method.heads:
        nn.init.zeros_(head.linear.weight)
        nn.init.zeros_(head.linear.bias)
    images = np.random.default_rng(0).normal(size=(2, 1) + CROP).astype(np.float32)
    batch = OrderReconstruction.make_batch(cfg, images, np.random.default_rng(1))
    assert set(batch) == {"data", "target", "order"} and batch["order"].shape == (2, 4)
    out = method.forward_loss(net, batch)
    assert out["cls"].item() == pytest.approx(3 * 4 * math.log(4), rel=1e-5)
    with torch.no_grad():
        pred = net(batch["data"])
    assert out["rec"].item() == pytest.approx(((pred - batch["target"]) ** 2).mean().item(), rel=1e-4)
    assert not torch.equal(batch["target"], batch["data"])  # the target is not the masked input
    assert out["loss"].item() == pytest.approx(out["cls"].item() + 0.5 * out["rec"].item(), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_make_batch_needs_configure():
    with pytest.raises(RuntimeError, match="configure"):
        OrderReconstruction.make_batch(OrderReconstructionConfig(), np.zeros((1, 1) + CROP, np.float32),
                                       np.random.default_rng(0))


def test_preview_shows_permutation_and_target():
    cfg = configured()
    images = np.random.default_rng(0).normal(size=(2, 1) + CROP).astype(np.float32)
    panels = OrderReconstruction.preview_from_images(cfg, images, np.random.default_rng(7))
    batch = OrderReconstruction.make_batch(cfg, images, np.random.default_rng(7))  # same draws
    titles = [t for t, _ in panels]
    assert len(panels) == 5 and all(v.shape == CROP for _, v in panels)
    order = batch["order"][0].tolist()
    assert str(order) in titles[1]
    assert np.array_equal(panels[2][1], batch["target"][0, 0].numpy())
    assert [panels[3][1][4 * j, 0, 0] for j in range(4)] == order  # the order label, slab by slab
    # slab ticks at the last slice of slabs 0-2, outer columns only; the rest is the network's input
    data = batch["data"][0, 0].numpy()
    inner = np.ones(CROP, bool)
    inner[[3, 7, 11]] = False
    assert np.array_equal(panels[1][1][inner], data[inner]) and np.array_equal(panels[1][1][:, :, 2:14],
                                                                               data[:, :, 2:14])
    assert (panels[1][1][7, :, :2] > data.max()).all()  # brighter than any voxel


def test_requires_levels_only():
    assert OrderReconstruction.requires == frozenset({"levels"})
    assert "plainconvunet" in compatible_architectures("order_reconstruction")
    assert OrderReconstruction.transfer == "encoder+decoder"
    assert dataclasses.asdict(OrderReconstructionConfig())["mask_ratio"] == 0.4


def test_cli_refuses_a_crop_without_two_slabs(pretrain_env, tmp_path, capsys):
    """ulkanet's tiny plans: a 32-deep patch and 32-fold depth downsampling leave the bottleneck one position."""
    from nnssl.cli.show_pretext import main

    with pytest.raises(SystemExit) as e:
        main(["-d", pretrain_env["dataset"], "-m", "order_reconstruction", "-a", "ulkanet", "--set", "slab_level=-1",
              "-o", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "B >= 2" in err and ">= 64" in err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("arch", ["unetr", "unetr_pp"])
def test_transformer_backbones_default_to_the_four_transformer_levels(arch):
    """Table VIII's best is t1..t4: four heads on the transformer levels, none on the input conv block (level 0,
    the only full-resolution level: depth 32 of the 32-deep crop)."""
    torch.manual_seed(0)
    crop = (32, 32, 32)
    cfg = OrderReconstruction.configure(OrderReconstruction.default_config(arch),
                                        lambda: build_network(arch, crop, 1, 1, preset="tiny"), crop, 1)
    net = build_network(arch, crop, 1, OrderReconstruction.network_output_channels(cfg), preset="tiny")
    method = OrderReconstruction(cfg, net, crop, 1)
    assert probe_level_shapes(net, crop, 1)[0][1] == 32
    assert method.levels == [1, 2, 3, 4] and len(method.heads) == 4
    assert cfg.backbone_defaults == arch and cfg.order_levels == "-4,-3,-2,-1"


def test_other_backbones_default_to_every_level():
    assert OrderReconstruction.default_config("plainconvunet") == OrderReconstructionConfig()
    assert OrderReconstructionConfig().order_levels == "all"
    assert make_method()[2].levels == [0, 1, 2]  # a head on every encoder level of the U-Net


def _mask_of(cfg, shape):
    images = np.zeros((1, 1) + shape, np.float32)
    return shuffle_and_mask(images, np.random.default_rng(0), 4, cfg)[1]


def test_unetr_pp_masks_fixed_4_cubed_patches_at_its_patch():
    """The authors' UNETR++ code masks 4³ patches of the 64 x 128 x 128 crop (not 16³ scaled to 11 x 21 x 21)."""
    shape = (64, 128, 128)
    assert _mask_of(OrderReconstructionConfig(), shape)["patch_size"] == (11, 21, 21)  # the generic scaling
    aux = _mask_of(OrderReconstruction.default_config("unetr_pp"), shape)
    assert aux["patch_size"] == (4, 4, 4)
    mask = aux["mask"][0].reshape(16, 4, 32, 4, 32, 4)
    blocks = mask.any(axis=(1, 3, 5))
    assert np.array_equal(blocks, mask.all(axis=(1, 3, 5)))  # constant on every 4³ block
    assert blocks.sum() == round(0.4 * 16 * 32 * 32)  # exactly 40 % of the 16384 patches


def test_unetr_pp_step1_optimizer_is_the_authors_sgd_with_poly_decay():
    cfg = OrderReconstruction.default_config("unetr_pp")
    opt = build_optimizer(cfg, [nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-4, 0.99, True, 3e-5)
    assert cfg.grad_clip == 12.0
    sched = schedule_from_config(cfg, 100, 1e-4)
    assert sched.kind == "poly" and sched.warmup_iterations == 0
    assert sched.lr(50) == pytest.approx(1e-4 * 0.5 ** 0.9)
    # UNETR keeps AdamW + warm-up/cosine; its warm-up is the authors' 50 of 800 epochs
    unetr = OrderReconstruction.default_config("unetr")
    assert isinstance(build_optimizer(unetr, [nn.Parameter(torch.zeros(2))]), torch.optim.AdamW)
    assert schedule_from_config(unetr, 800, 1e-4).warmup_iterations == 50
