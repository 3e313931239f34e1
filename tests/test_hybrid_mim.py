"""HybridMIM (nnssl.ssl.hybrid_mim): NT-Xent, partial decoding, the loss terms, refusals."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnssl.architectures.swinunetr import TINY, SwinUNETR
from nnssl.errors import NnsslError
from nnssl.ssl.base import check_compatible, compatible_architectures
from nnssl.ssl.encoder_dropout import has_active_dropout
from nnssl.ssl.hybrid_mim import HybridMIM, HybridMIMConfig, nt_xent, partial_decode
from nnssl.transforms.hybrid_masking import region_offsets, voxel_mask


def unet(norm=nn.InstanceNorm3d, stages=3, channels=1):
    """A small nnU-Net PlainConvUNet (strides 1, 2, 2, ...: coarsest stride 2^(stages-1))."""
    return PlainConvUNet(channels, stages, [4, 8, 16, 16][:stages], nn.Conv3d, 3, [1, 2, 2, 2][:stages], 2, channels,
                         [2] * (stages - 1), False, norm, {"affine": True} if norm else None, None, None, nn.LeakyReLU,
                         {"inplace": True})


def test_nt_xent_orthogonal_pairs_by_hand():
    """Three pairs of identical one-hot vectors: cos = 1 to the pair, 0 to the 4 others, τ = 0.5, so every
    anchor's loss is -log(e^2 / (e^2 + 4))."""
    e = torch.eye(3)
    expected = -math.log(math.exp(2) / (math.exp(2) + 4))
    assert nt_xent(e, e, 0.5).item() == pytest.approx(expected, rel=1e-6)
    # eq. 6 as printed (the positive left out of the denominator): -log(e^2 / 4)
    assert nt_xent(e, e, 0.5, exclude_positive=True).item() == pytest.approx(-math.log(math.exp(2) / 4), rel=1e-6)


def test_nt_xent_three_vectors_by_hand():
    """N = 3 with the views a = (1, 0), (0, 1), (1, 1) and b = (1, 0), (1, 1), (-1, 0), τ = 0.5.

    Cosines of the 6 vectors [a0, a1, a2, b0, b1, b2] (s = 1/√2), by hand:
        a0: a1 0, a2 s, b0 1, b1 s, b2 -1        a1: a0 0, a2 s, b0 0, b1 s, b2 0
        a2: a0 s, a1 s, b0 s, b1 1, b2 -s        b0: a0 1, a1 0, a2 s, b1 s, b2 -1
        b1: a0 s, a1 s, a2 1, b0 s, b2 -s        b2: a0 -1, a1 0, a2 -s, b0 -1, b1 -s
    positives: a0-b0, a1-b1, a2-b2 (and back)."""
    s = 1 / math.sqrt(2)
    rows = {  # anchor: (cosine to its positive, cosines to every other vector but itself)
        "a0": (1, [0, s, 1, s, -1]), "a1": (s, [0, s, 0, s, 0]), "a2": (-s, [s, s, s, 1, -s]),
        "b0": (1, [1, 0, s, s, -1]), "b1": (s, [s, s, 1, s, -s]), "b2": (-s, [-1, 0, -s, -1, -s])}
    expected = np.mean([-pos / 0.5 + math.log(sum(math.exp(c / 0.5) for c in others))
                        for pos, others in rows.values()])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    assert nt_xent(a, b, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_partial_decoding_equals_the_centre_crop_away_from_the_borders():
    """No normalisation (or any per-voxel one): the decoder's convs only see zero padding instead of
    their neighbours within the receptive-field margin of the region's border. Decoder of this U-Net:
    2 convs (3^3) at stride 2 and 2 at stride 1 -> margin 2 * 2 + 2 * 1 = 6 voxels."""
    torch.manual_seed(0)
    net = unet(norm=None).eval()
    x = torch.randn(1, 1, 48, 48, 48)
    with torch.no_grad():
        feats = net.encoder(x)
        full = net.decoder(feats)
        part, start = partial_decode(net, feats, (48, 48, 48), (32, 32, 32), (0.5, 0.5, 0.5))
    assert start == (8, 8, 8) and part.shape == (1, 1, 32, 32, 32)
    m = 6
    inner = part[..., m:-m, m:-m, m:-m]
    assert torch.allclose(inner, full[..., 8 + m:40 - m, 8 + m:40 - m, 8 + m:40 - m], atol=1e-5)
    assert not torch.allclose(part, full[..., 8:40, 8:40, 8:40], atol=1e-3)  # the margin does differ


def test_partial_decoding_with_instance_norm_is_not_a_crop():
    """nnU-Net's default U-Net normalises each decoder map over its (now cropped) extent, so the partial
    output differs everywhere from the full one: pretraining trains the decoder on region statistics."""
    torch.manual_seed(0)
    net = unet().eval()
    x = torch.randn(1, 1, 48, 48, 48)
    with torch.no_grad():
        feats = net.encoder(x)
        full = net.decoder(feats)[..., 8:40, 8:40, 8:40]
        part, _ = partial_decode(net, feats, (48, 48, 48), (32, 32, 32), (0.5, 0.5, 0.5))
    assert not torch.allclose(part[..., 6:-6, 6:-6, 6:-6], full[..., 6:-6, 6:-6, 6:-6], atol=1e-3)


def _batch(cfg, crop, b=2, seed=0, channels=1):
    images = np.random.default_rng(seed).normal(size=(b, channels, *crop)).astype(np.float32)
    return HybridMIM.make_batch(cfg, images, np.random.default_rng(seed + 1)), images


def test_make_batch_and_loss_terms():
    cfg = HybridMIMConfig()
    crop = (32, 64, 64)
    batch, images = _batch(cfg, crop)
    assert batch["data"].shape == (2, 1, *crop) and torch.equal(batch["image"], torch.from_numpy(images))
    assert batch["counts"].shape == (2, 4) and batch["locations"].shape == (2, 4, 8)
    assert torch.equal(batch["counts"].long(), batch["locations"].sum(-1))
    assert int(batch["counts"].sum()) == 2 * round(0.4 * 32)
    torch.manual_seed(0)
    net = unet(stages=4)  # coarsest stride 8: the 32^3 region in 64 is centred at (0, 16, 16)
    method = HybridMIM(cfg, net, crop, 1)
    assert method.region == (32, 32, 32) and method.alignment == (8, 8, 8)
    assert len(method._dropout_hooks) == len(net.encoder.stages)  # dropout after every encoder stage
    losses = method.forward_loss(net, batch)
    assert set(losses) == {"pr", "num", "loc", "con", "cl", "cl_pos_cos", "loss"}
    total = losses["pr"] + 0.1 * losses["num"] + 0.1 * losses["loc"] + 0.01 * losses["con"] + 0.1 * losses["cl"]
    assert torch.allclose(losses["loss"], total)
    # untrained heads: the number CE is about log 9, the location BCE about 8 log 2
    assert abs(losses["num"].item() - math.log(9)) < 1.0 and abs(losses["loc"].item() - 8 * math.log(2)) < 2.0
    losses["loss"].backward()
    assert method.number_head.weight.grad is not None and net.decoder.seg_layers[-1].weight.grad is not None


def test_reconstruction_loss_counts_masked_region_voxels_only():
    """A decoder that returns 0 everywhere: L_PR is the mean of image² over the masked voxels of the region."""
    cfg = HybridMIMConfig()
    crop = (32, 64, 64)
    batch, images = _batch(cfg, crop, seed=4)
    net = unet(stages=4)
    method = HybridMIM(cfg, net, crop, 1)

    class ZeroDecoder(nn.Module):
        def forward(self, features):
            return features[0][:, :1] * 0

    net.decoder = ZeroDecoder()
    losses = method.forward_loss(net, batch)
    start = region_offsets(crop, (32, 32, 32), (8, 8, 8), batch["region_coin"].tolist())
    box = tuple(slice(s, s + 32) for s in start)
    vox = voxel_mask(batch["patch_mask"].numpy(), method.geometry)[(slice(None),) + box]
    expected = (images[:, 0][(slice(None),) + box] ** 2)[vox].mean()
    assert losses["pr"].item() == pytest.approx(float(expected), rel=1e-5)


def test_swinunetr_backbone_gets_the_authors_drop_rate_and_distinct_views():
    """The authors pretrain SwinUNETR with drop_rate 0.1: the two passes of one masked crop differ clearly."""
    cfg = HybridMIMConfig()
    crop = (32, 64, 64)
    torch.manual_seed(0)
    net = SwinUNETR(1, 1, **TINY)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert not has_active_dropout(net.encoder)
    method = HybridMIM(cfg, net, crop, 1)
    assert method.alignment == (32, 32, 32) and has_active_dropout(net.encoder) and not method._dropout_hooks
    assert net.encoder.swinViT.pos_drop.p == 0.1
    state = net.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    losses = method.forward_loss(net, _batch(cfg, crop, b=4)[0])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["cl_pos_cos"].item() < 0.99  # measured 0.975


def test_batch_of_one_with_the_contrastive_term_is_refused():
    cfg = HybridMIMConfig()
    net = unet(stages=4)
    method = HybridMIM(cfg, net, (32, 64, 64), 1)
    with pytest.raises(NnsslError, match="negatives"):
        method.forward_loss(net, _batch(cfg, (32, 64, 64), b=1)[0])
    assert HybridMIM.min_batch_size == 2
    no_cl = dataclasses.replace(cfg, weight_cl=0.0)
    losses = HybridMIM(no_cl, net, (32, 64, 64), 1).forward_loss(net, _batch(no_cl, (32, 64, 64), b=1)[0])
    assert losses["cl"].item() == 0.0


def test_bad_region_and_crop_are_refused():
    net = unet(stages=4)
    with pytest.raises(NnsslError, match="larger than the crop"):
        HybridMIM(HybridMIMConfig(region_size=(64, 64, 64)), net, (32, 64, 64), 1)
    with pytest.raises(NnsslError, match="not divisible into whole sub-volumes"):
        HybridMIM.configure(HybridMIMConfig(), lambda: net, (48, 64, 64), 1)
    cfg = HybridMIM.configure(HybridMIMConfig(), lambda: net, (32, 64, 64), 2)
    assert cfg.reconstruct_channels == 2 and cfg.region_alignment == (8, 8, 8)
    assert HybridMIM.network_output_channels(cfg) == 2


def test_incompatible_architecture_names_the_compatible_ones():
    can = compatible_architectures("hybrid_mim")
    assert {"plainconvunet", "resenc", "swinunetr"} <= set(can) and "logonet" not in can
    with pytest.raises(NnsslError, match="plainconvunet.*swinunetr"):
        check_compatible("hybrid_mim", "logonet")


def test_preview_panels():
    cfg = dataclasses.replace(HybridMIMConfig(), region_alignment=(32, 32, 32))
    images = np.random.default_rng(0).normal(size=(2, 1, 32, 64, 64)).astype(np.float32)
    panels = dict(HybridMIM.preview_from_images(cfg, images, np.random.default_rng(1)))
    batch = HybridMIM.make_batch(cfg, images, np.random.default_rng(1))  # same draws
    counts = panels["masked patches per sub-volume (0-8)"]
    assert counts[0, 0, 0] == batch["counts"][0, 0] and counts[0, 63, 63] == batch["counts"][0, 3]
    region = panels["reconstruction region (1), its masked voxels (2)"]
    assert (region > 0).sum() == 32 ** 3 and set(np.unique(region)) <= {0.0, 1.0, 2.0}
    grid = panels["masked input, sub-volume grid"]
    assert (grid[:, 32, :] == images[0, 0].max()).all()  # the sub-volume border along H


def test_dropout_is_inside_the_encoder_and_the_state_dict_stays_the_planned_one():
    """nnU-Net's U-Net has no dropout: hooks drop after every encoder stage in training mode only, so
    every level (not just the bottleneck) differs between two passes, and nothing is added to the
    state dict. (The replaced design dropped only the pooled bottleneck of one pass.)"""
    crop = (32, 64, 64)
    torch.manual_seed(0)
    net = unet(stages=4)
    x = torch.randn(2, 1, *crop)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        plain = net.eval().encoder(x)
        method = HybridMIM(HybridMIMConfig(), net, crop, 1)
        assert len(method._dropout_hooks) == 4
        state = net.state_dict()
        assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
        assert all(torch.equal(a, b) for a, b in zip(net.encoder(x), plain))  # eval: the hooks do nothing
        first, second = net.train().encoder(x), net.encoder(x)
    assert all(not torch.allclose(a, b) for a, b in zip(first, second))
    assert len(HybridMIM(HybridMIMConfig(encoder_dropout_stages="first"), unet(stages=4), crop, 1)._dropout_hooks) == 1
    assert not HybridMIM(HybridMIMConfig(weight_cl=0.0), unet(stages=4), crop, 1)._dropout_hooks
    with pytest.raises(NnsslError, match="encoder_dropout_stages"):
        HybridMIMConfig(encoder_dropout_stages="last")


@pytest.mark.parametrize("second_pass_grad", [False, True])
def test_two_encoder_passes_the_second_without_gradient_and_distinct_views(second_pass_grad):
    """As the authors: the masked crop is encoded twice, the second time under no_grad (a field)."""
    cfg = HybridMIMConfig(second_pass_grad=second_pass_grad)
    crop = (32, 64, 64)
    torch.manual_seed(0)
    net = unet(stages=4)
    method = HybridMIM(cfg, net, crop, 1)
    grad_modes = []
    net.encoder.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    losses = method.forward_loss(net, _batch(cfg, crop, b=4)[0])
    assert grad_modes == [True, second_pass_grad]
    assert 0.9 < losses["cl_pos_cos"].item() < 0.9999  # measured 0.9986; the same view twice gives 1
    assert not losses["cl_pos_cos"].requires_grad


class _PatchFractions(nn.Module):
    """A stand-in encoder: level 0 is the input, the bottleneck (stride 32) has 8 channels per 32^3
    sub-volume, channel k = the mean of the input over its patch k (raster order of the 2x2x2 patches)."""

    output_channels = [1, 8]
    strides = [1, 32]

    def forward(self, x):
        b = x.shape[0]
        per_patch = F.avg_pool3d(x[:, :1], 16)  # [B, 1, 2 gd, 2 gh, 2 gw]
        gd, gh, gw = (s // 2 for s in per_patch.shape[2:])
        z = per_patch.reshape(b, gd, 2, gh, 2, gw, 2).permute(0, 2, 4, 6, 1, 3, 5).reshape(b, 8, gd, gh, gw)
        return [x, z]


class _ZeroDecoder(nn.Module):
    def forward(self, features):
        return features[0][:, :1] * 0


def test_pooled_sub_volume_r_meets_label_row_r():
    """Crops of ones: a masked patch reads 0, an unmasked one 1, so sub-volume r's pooled feature is the
    inverse of its location bits and 8 minus its count. Heads that decode exactly that reach loss ~0 only
    if forward_loss pairs pooled sub-volume r with label row r (and patch k with bit k)."""
    cfg = HybridMIMConfig(weight_cl=0.0)
    crop = (32, 64, 64)  # 4 sub-volumes
    batch = HybridMIM.make_batch(cfg, np.ones((2, 1, *crop), np.float32), np.random.default_rng(3))
    assert len({tuple(row) for row in batch["locations"].reshape(-1, 8).tolist()}) > 4  # rows tell apart
    net = nn.Module()
    net.encoder, net.decoder = _PatchFractions(), _ZeroDecoder()
    method = HybridMIM(cfg, net, crop, 1)
    s = 40.0
    k = torch.arange(9, dtype=torch.float32)
    with torch.no_grad():  # number logits s * (k * count - k^2 / 2): largest at k = count
        method.number_head.weight.copy_(-s * k[:, None].expand(9, 8))
        method.number_head.bias.copy_(s * (8 * k - k ** 2 / 2))
        method.location_head.weight.copy_(-s * torch.eye(8))  # logit s * (1/2 - fraction): masked -> 1
        method.location_head.bias.fill_(s / 2)
        losses = method.forward_loss(net, batch)
        assert losses["num"].item() < 1e-4 and losses["loc"].item() < 1e-4
        rolled = dict(batch, counts=batch["counts"].roll(1, dims=1), locations=batch["locations"].roll(1, dims=1))
        assert method.forward_loss(net, rolled)["loc"].item() > 1.0


def test_cl_pos_cos_reaches_the_training_log(pretrain_env):
    from nnssl.training.pretrainer import pretrain
    out = pretrain("Dataset001_Blobs", "hybrid_mim", "plainconvunet", iterations=2, iterations_per_epoch=2,
                   batch_size=2, device="cpu", num_workers=0)
    with open(f"{out}/training_log.txt", encoding="utf-8") as f:
        line = next(line for line in f if "cl_pos_cos" in line)
    value = float(line.split("cl_pos_cos ")[1].split(",")[0])
    assert 0.5 < value < 1.0
