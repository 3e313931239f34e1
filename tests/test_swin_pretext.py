"""swin_pretext (QT-UNet's Swin-UNETR-style SSL): views, heads, BYOL loss and EMA, collapse watch, resume."""
import math
import os

import numpy as np
import pytest
import torch

from nnssl.architectures.qt_unet import TINY, QTUNet
from nnssl.checkpoints import load_resume_checkpoint
from nnssl.errors import NnsslError
from nnssl.ssl.swin_pretext import SwinPretext, SwinPretextConfig, byol_loss, ema_tau, make_views
from nnssl.training.pretrainer import pretrain

SMALL = dict(byol_hidden=32, byol_out=8, rotation_hidden=8)


def method(patch=(32, 32, 32), **cfg):
    torch.manual_seed(0)
    net = QTUNet(1, 1, **TINY)
    return net, SwinPretext(SwinPretextConfig(**{**SMALL, **cfg}), net, patch, 1)


def crops(b=2, shape=(32, 32, 32), seed=0):
    return np.random.default_rng(seed).normal(size=(b, 1, *shape)).astype(np.float32)


def test_views_are_rotated_crops_with_cutouts_and_targets_the_original():
    cfg = SwinPretextConfig()
    x = crops(b=3)
    views, ks, boxes, targets = make_views(cfg, x, np.random.default_rng(0))
    assert views.shape == (6, 1, 32, 32, 32) and ks.shape == (6,) and len(boxes) == 6
    for row in range(6):
        rotated = np.rot90(x[row % 3], ks[row], axes=(2, 3))
        outside = ~np.any([np.zeros((32,) * 3, bool)] + [_mask(b) for b in boxes[row]], axis=0)
        assert np.array_equal(views[row][:, outside], rotated[:, outside])
        assert 1 <= len(boxes[row]) <= 3
        assert np.array_equal(targets[row], x[row % 3])  # the un-augmented crop
    rotated_cfg = SwinPretextConfig(recon_target="rotated")
    views2, ks2, _, targets2 = make_views(rotated_cfg, x, np.random.default_rng(0))
    assert np.array_equal(views2, views)  # same draws
    assert np.array_equal(targets2[4], np.rot90(x[1], ks2[4], axes=(2, 3)))


def _mask(box):
    m = np.zeros((32,) * 3, bool)
    m[tuple(slice(a, b) for a, b in box)] = True
    return m


def test_crop_is_squared_in_the_rotation_plane_or_refused():
    assert SwinPretext.crop_size(SwinPretextConfig(), (80, 192, 160)) == (80, 160, 160)
    assert SwinPretext.crop_size(SwinPretextConfig(), (96, 96, 96)) == (96, 96, 96)
    with pytest.raises(NnsslError, match="square_crop"):
        SwinPretext.crop_size(SwinPretextConfig(square_crop=False), (80, 192, 160))


def test_byol_loss_by_hand():
    z = torch.randn(5, 8)
    assert byol_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(3 * z, z).item() == pytest.approx(0.0, abs=1e-6)  # only directions count
    assert byol_loss(z, -z).item() == pytest.approx(4.0)
    e = torch.eye(2)
    assert byol_loss(e[:1], e[1:]).item() == pytest.approx(2.0)  # orthogonal: 2 - 0


def test_ema_tau_schedule_by_hand():
    assert ema_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert ema_tau(50, 100, 0.996) == pytest.approx(0.998)
    assert ema_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert ema_tau(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def test_ema_update_formula_by_hand():
    net, m = method()
    with torch.no_grad():
        for p in m.target_encoder.parameters():
            p.fill_(2.0)
        for p in net.encoder.parameters():
            p.fill_(-1.0)
        for p in m.target_projector.parameters():
            p.fill_(1.0)
        for p in m.projector.parameters():
            p.fill_(0.0)
    m.after_step(50, 100)  # tau = 0.998
    for p in m.target_encoder.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.998 * 2.0 + 0.002 * -1.0))
    for p in m.target_projector.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.998))
    assert all(p.eq(-1.0).all() for p in net.encoder.parameters())  # the online network is untouched


def test_heads_shapes_and_what_trains():
    net, m = method()
    c = net.config.embed_dim * 8  # bottleneck width, grid 1^3 at 32^3
    assert m.recon_head.kernel_size == (32, 32, 32) and m.recon_head.stride == (32, 32, 32)
    assert m.projector[0].in_features == c  # pooled bottleneck (default)
    _, pooled = method(patch=(64, 64, 64))
    _, flat = method(patch=(64, 64, 64), byol_pool=False)  # the authors' flattened bottleneck
    assert pooled.projector[0].in_features == c and flat.projector[0].in_features == c * 8  # 2^3 grid
    assert not any(p.requires_grad for p in m.target_encoder.parameters())
    assert SwinPretext.transfer == "encoder" and SwinPretext.requires == {"bottleneck"}
    assert "target_encoder.patch_embed.weight" in m.state_dict()  # EMA target is checkpointed
    assert not any(k.startswith("_online") or k.startswith("network") for k in m.state_dict())

    batch = SwinPretext.make_batch(m.cfg, crops(), np.random.default_rng(0))
    losses = m.forward_loss(net, batch)
    assert set(losses) == {"recon", "rotation", "byol", "monitor_proj_std", "loss"}
    assert losses["loss"].item() == pytest.approx(losses["recon"].item() + losses["rotation"].item()
                                                  + losses["byol"].item(), rel=1e-6)
    assert not losses["monitor_proj_std"].requires_grad
    losses["loss"].backward()
    assert net.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.decoder.parameters())  # only the encoder is pretrained
    for head in (m.recon_head, m.rotation_head, m.projector, m.predictor):
        assert all(p.grad is not None for p in head.parameters())


def test_each_loss_term_reaches_the_encoder():
    net, m = method()
    batch = SwinPretext.make_batch(m.cfg, crops(), np.random.default_rng(0))
    for term in ("recon", "rotation", "byol"):
        net.zero_grad()
        m.forward_loss(net, batch)[term].backward()
        assert net.encoder.stages[-1][0].attn.qkv.weight.grad.abs().sum() > 0, term


def test_batch_of_one_works_and_warns():
    with pytest.warns(UserWarning, match="batch size 1"):
        net, m = method(batch_size=1)
    batch = SwinPretext.make_batch(m.cfg, crops(b=1), np.random.default_rng(0))
    losses = m.forward_loss(net, batch)  # BatchNorm sees the 2 views: no "more than 1 value" error
    assert torch.isfinite(losses["loss"])


def test_collapse_watch():
    net, m = method()
    batch = SwinPretext.make_batch(m.cfg, crops(b=4), np.random.default_rng(0))
    healthy = m.forward_loss(net, batch)["monitor_proj_std"].item()
    assert 0.3 < healthy < 2.0
    with torch.no_grad():  # every crop projected to the same point: a collapsed projector
        m.projector[-1].weight.zero_()
    assert m.forward_loss(net, batch)["monitor_proj_std"].item() == pytest.approx(0.0, abs=1e-6)
    warn = m.epoch_messages({"losses": {"monitor_proj_std": 0.01}})
    assert len(warn) == 1 and "collapsing" in warn[0]
    assert m.epoch_messages({"losses": {"monitor_proj_std": 0.9}}) == []


def test_preview_shows_both_views_labels_cutouts_and_target():
    cfg = SwinPretextConfig()
    x = crops()
    panels = SwinPretext.preview_from_images(cfg, x, np.random.default_rng(3))
    batch = SwinPretext.make_batch(cfg, x, np.random.default_rng(3))
    titles = [t for t, _ in panels]
    k1, k2 = batch["rotations"][0].item(), batch["rotations"][2].item()
    assert titles[1].startswith(f"view 1 (rotation k={k1}") and titles[3].startswith(f"view 2 (rotation k={k2}")
    assert np.array_equal(panels[1][1], batch["views"][0, 0].numpy())  # same draws as make_batch
    assert np.array_equal(panels[3][1], batch["views"][2, 0].numpy())
    assert set(np.unique(panels[2][1])) <= {0.0, 1.0} and panels[2][1].sum() > 0  # cutout boxes
    assert np.array_equal(panels[-1][1], x[0, 0]) and "reconstruction target" in titles[-1]
    assert [t for t, _ in SwinPretext.preview(cfg, batch)][0].startswith(f"view 1 (rotation k={k1}")


def test_bad_config_is_refused():
    with pytest.raises(NnsslError, match="recon_target"):
        SwinPretextConfig(recon_target="masked")
    with pytest.raises(NnsslError, match="cutout_min_boxes"):
        SwinPretextConfig(cutout_min_boxes=0)


def test_resume_is_bit_exact_with_the_ema_target_and_warnings_reach_the_log(pretrain_env, tmp_path, monkeypatch):
    args = dict(dataset="Dataset001_Blobs", method="swin_pretext", architecture="plainconvunet", iterations=4,
                iterations_per_epoch=2, batch_size=2, device="cpu", num_workers=0,
                overrides=["byol_hidden=64", "byol_out=16", "rotation_hidden=16",
                           "collapse_warn_std=100"])  # every epoch "collapses": the warning path is exercised
    full = pretrain(**args, output_folder=str(tmp_path / "full"))
    with open(os.path.join(full, "training_log.txt"), encoding="utf-8") as f:
        assert f.read().count("WARNING swin_pretext: the BYOL projections are collapsing") == 2  # 2 epochs
    real, calls = SwinPretext.forward_loss, []

    def interrupted(self, network, batch):
        if len(calls) == 2:  # iteration 2, after checkpoint_latest at iteration 2 was written
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, network, batch)

    monkeypatch.setattr(SwinPretext, "forward_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(**args, output_folder=str(tmp_path / "part"))
    monkeypatch.setattr(SwinPretext, "forward_loss", real)
    pretrain(**args, output_folder=str(tmp_path / "part"), resume=True)
    a = load_resume_checkpoint(os.path.join(full, "checkpoint_final.pth"))
    b = load_resume_checkpoint(os.path.join(str(tmp_path / "part"), "checkpoint_final.pth"))
    for k, v in a["network_weights"].items():
        assert torch.equal(v, b["network_weights"][k]), k
    state_a, state_b = a["resume"]["method_state"], b["resume"]["method_state"]
    assert state_a.keys() == state_b.keys()
    targets = [k for k in state_a if k.startswith("target_encoder.")]
    assert targets
    for k, v in state_a.items():
        assert torch.equal(v, state_b[k]), k
    # the target moved off the online encoder's weights but not all the way (tau < 1)
    online = a["network_weights"]
    moved = [k for k in targets if k.removeprefix("target_") in online
             and not torch.equal(state_a[k], online[k.removeprefix("target_")])]
    assert moved


class _Subsampler(torch.nn.Module):
    """A stand-in encoder whose bottleneck is the input subsampled by 8 ([B, 2, 16^3] -> [B, 2, 2^3])."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return [x[:, :, ::8, ::8, ::8] * self.scale]


def test_loss_sums_every_term_over_both_views_and_pairs_each_view_with_the_other():
    """Hand-computed: identity projector/predictor/target projector (so p and z' are the pooled view),
    a zero reconstruction (L1 = mean |target|) and fixed rotation logits. Rows: crop 0 view 1, crop 1
    view 1, crop 0 view 2, crop 1 view 2, each a constant 2-channel vector."""
    net = torch.nn.Module()
    net.encoder = _Subsampler()
    m = SwinPretext(SwinPretextConfig(**SMALL), net, (16, 16, 16), 2)
    m.projector = m.predictor = m.target_projector = torch.nn.Identity()
    with torch.no_grad():
        m.recon_head.weight.zero_()
        m.recon_head.bias.zero_()
        m.rotation_head[-1].weight.zero_()
        m.rotation_head[-1].bias.copy_(torch.tensor([0.0, math.log(3), 0.0, 0.0]))  # softmax 1/6, 3/6, 1/6, 1/6
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    views = rows[:, :, None, None, None].expand(4, 2, 16, 16, 16).contiguous()
    target = torch.cat([torch.full((2, 2, 16, 16, 16), 1.0), torch.full((2, 2, 16, 16, 16), -3.0)])
    losses = m.forward_loss(net, {"views": views, "rotations": torch.tensor([0, 0, 1, 1]), "target": target})
    assert losses["recon"].item() == pytest.approx(1.0 + 3.0)  # the view mean would be 2
    assert losses["rotation"].item() == pytest.approx(math.log(6) + math.log(2))  # CE(v1) + CE(v2)
    # crop 0: cos((1, 0), (1, 1)) = 1/sqrt(2); crop 1: cos((0, 1), (1, 0)) = 0; per direction the batch mean
    byol = 2 * ((2 - math.sqrt(2)) + 2) / 2
    assert losses["byol"].item() == pytest.approx(byol)
    # (A view paired with itself would give 0, one paired with the other crop's view 2 - sqrt(2).)
    assert losses["loss"].item() == pytest.approx(4.0 + math.log(12) + byol)
