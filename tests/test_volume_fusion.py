"""Volume Fusion: the box draw, label painting, fusion arithmetic, batch pairing and the loss."""
import numpy as np
import pytest
import torch
from torch import nn

from nnssl.errors import NnsslError
from nnssl.ssl import METHODS
from nnssl.ssl.volume_fusion import VolumeFusion, VolumeFusionConfig
from nnssl.transforms.volume_fusion import (FusionDraw, apply_fusion, draw_fusion_boxes, fuse,
                                            paint_label_map, scaled_box_size_range, volume_fusion_batch)

CFG = VolumeFusionConfig()


def _draw_stats(shape, n_draws, seed=0):
    rng = np.random.default_rng(seed)
    draws = [draw_fusion_boxes(rng, shape, CFG) for _ in range(n_draws)]
    bounds = np.concatenate([d.bounds for d in draws])
    return draws, bounds[:, :3], bounds[:, 3:]


@pytest.mark.parametrize("shape, lo, hi", [((64, 128, 128), (8, 8, 8), (40, 80, 80)),
                                           ((32, 64, 64), (4, 4, 4), (20, 40, 40))])
def test_box_counts_and_sizes_within_scaled_ranges(shape, lo, hi):
    assert [list(r) for r in scaled_box_size_range(shape, CFG)] == [list(lo), list(hi)]
    draws, start, stop = _draw_stats(shape, 1500)
    counts = np.array([len(d.labels) for d in draws])
    assert counts.min() == 10 and counts.max() == 40  # inclusive U{10..40}
    size = stop - start
    shape = np.array(shape)
    assert (start >= 0).all() and (stop <= shape).all()
    # Clipping keeps at least ceil(size / 2) voxels (the centre lies inside the volume).
    assert (size >= (np.array(lo) + 1) // 2).all() and (size <= np.array(hi)).all()
    interior = (start > 0) & (stop < shape)  # unclipped on that axis: the drawn size itself
    for ax in range(3):
        s = size[interior[:, ax], ax]
        assert s.min() == lo[ax] and s.max() == hi[ax]


def test_box_centres_span_volume_and_labels_are_1_to_K():
    shape = (64, 128, 128)
    draws, start, stop = _draw_stats(shape, 300)
    # Near every border some box reaches the first / last voxel; centres cover each axis.
    assert (start.min(0) == 0).all() and (stop.max(0) == np.array(shape)).all()
    centres = (start + stop) / 2
    for ax, s in enumerate(shape):
        hist = np.histogram(centres[:, ax], bins=4, range=(0, s))[0]
        assert (hist > 0.1 * len(centres)).all()
    labels = np.concatenate([d.labels for d in draws])
    assert set(np.unique(labels)) == {1, 2, 3, 4}


def test_paint_later_boxes_overwrite_earlier():
    draw = FusionDraw(bounds=np.array([[0, 0, 0, 4, 4, 4], [2, 2, 2, 6, 6, 6]]), labels=np.array([1, 3], np.uint8))
    lab = paint_label_map(draw, (6, 6, 6))
    assert lab.dtype == np.uint8
    assert lab[0, 0, 0] == 1 and lab[3, 3, 3] == 3 and lab[5, 5, 5] == 3 and lab[5, 0, 0] == 0
    assert lab[1, 3, 3] == 1 and lab[3, 1, 1] == 1  # first box where the second does not cover
    assert (lab == 3).sum() == 4 ** 3 and (lab == 1).sum() == 4 ** 3 - 2 ** 3
    swapped = paint_label_map(FusionDraw(draw.bounds[::-1], draw.labels[::-1]), (6, 6, 6))
    assert swapped[3, 3, 3] == 1  # order matters


def test_fuse_hand_computed_values_and_in_place():
    bg = np.full((2, 1, 3), -1.0, np.float32)
    fg = np.full((2, 1, 3), 3.0, np.float32)
    label = np.array([[[0, 1, 2]], [[3, 4, 0]]], np.uint8)
    out = fuse(bg, fg, label, K=4)
    # α = label / 4: 0.25·3 + 0.75·(−1) = 0, 0.5 → 1, 0.75·3 + 0.25·(−1) = 2, 1 → fg.
    np.testing.assert_array_equal(out, [[[-1.0, 0.0, 1.0]], [[2.0, 3.0, -1.0]]])
    assert out.dtype == np.float32 and bg[0, 0, 0] == -1.0  # bg untouched without out=
    rng = np.random.default_rng(1)
    bg, fg = rng.normal(size=(2, 5, 7, 9)).astype(np.float32), rng.normal(size=(2, 5, 7, 9)).astype(np.float32)
    label = rng.integers(0, 5, size=(5, 7, 9)).astype(np.uint8)
    expected = bg.copy()
    res = fuse(bg, fg, label, 4, out=bg)
    assert res is bg
    alpha = label / 4
    np.testing.assert_allclose(res, alpha * fg + (1 - alpha) * expected, atol=1e-6)
    np.testing.assert_array_equal(res[:, label == 0], expected[:, label == 0])  # label 0: bg exactly
    np.testing.assert_array_equal(res[:, label == 4], fg[:, label == 4])  # label K: fg exactly


def test_batch_rolls_foreground_by_one_and_shares_alpha_across_channels():
    b, shape = 3, (16, 24, 24)
    images = np.empty((b, 2) + shape, np.float32)
    for i in range(b):
        images[i, 0], images[i, 1] = 10.0 * i, -5.0 * i
    before = images.copy()
    fused, labels = volume_fusion_batch(images, np.random.default_rng(3), CFG)
    np.testing.assert_array_equal(images, before)  # input not modified
    assert fused.shape == images.shape and fused.dtype == np.float32
    assert labels.shape == (b, 1) + shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(range(CFG.K + 1)) and len(np.unique(labels)) > 1
    for i in range(b):
        j = (i + 1) % b
        alpha = labels[i, 0] / CFG.K
        np.testing.assert_allclose(fused[i, 0], (1 - alpha) * 10.0 * i + alpha * 10.0 * j, atol=1e-5)
        np.testing.assert_allclose(fused[i, 1], (1 - alpha) * -5.0 * i + alpha * -5.0 * j, atol=1e-5)


def test_reproducible_per_seed_and_seeds_differ():
    images = np.random.default_rng(0).normal(size=(2, 1, 16, 32, 32)).astype(np.float32)
    a = volume_fusion_batch(images, np.random.default_rng(7), CFG)
    b = volume_fusion_batch(images, np.random.default_rng(7), CFG)
    c = volume_fusion_batch(images, np.random.default_rng(8), CFG)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_batch_of_one_is_refused():
    images = np.zeros((1, 1, 8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="at least 2"):
        volume_fusion_batch(images, np.random.default_rng(0), CFG)
    with pytest.raises(ValueError, match="at least 2"):
        apply_fusion(images, [], CFG.K)
    assert VolumeFusion.min_batch_size == 2


def test_config_validation_and_registry():
    assert METHODS.get("volume_fusion") is VolumeFusion
    assert VolumeFusion.network_output_channels(VolumeFusionConfig(K=2)) == 3
    assert VolumeFusionConfig(box_size_min=[4, 4, 4]).box_size_min == (4, 4, 4)
    for bad in ({"K": 0}, {"min_boxes": 5, "max_boxes": 2}, {"box_size_min": (50, 8, 8)}, {"reference_patch": (64, 128)}):
        with pytest.raises(NnsslError):
            VolumeFusionConfig(**bad)


def test_make_batch_and_previews():
    images = np.random.default_rng(0).normal(size=(2, 1, 16, 32, 32)).astype(np.float32)
    batch = VolumeFusion.make_batch(CFG, images, np.random.default_rng(5))
    assert batch["data"].dtype == torch.float32 and batch["target"].shape == (2, 1, 16, 32, 32)
    titles = VolumeFusion.preview_from_images(CFG, images, np.random.default_rng(5))
    assert [t for t, _ in titles][:2] == ["background", "foreground"]
    vols = [v for _, v in titles]
    assert all(v.shape == (16, 32, 32) for v in vols)
    np.testing.assert_array_equal(vols[0], images[0, 0])
    np.testing.assert_array_equal(vols[1], images[1, 0])
    np.testing.assert_array_equal(vols[2], batch["data"][0, 0].numpy())  # same draws as make_batch
    np.testing.assert_array_equal(vols[3], batch["target"][0, 0].numpy())
    with pytest.raises(NnsslError, match="3d"):
        VolumeFusion.make_batch(CFG, images[:, :, 0], np.random.default_rng(0))


class _Oracle(nn.Module):
    """Returns huge logits for a stored target (deep-supervision style list)."""

    def __init__(self, target, k):
        super().__init__()
        onehot = torch.nn.functional.one_hot(target[:, 0].long(), k + 1).permute(0, 4, 1, 2, 3).float()
        self.logits = 50.0 * onehot

    def forward(self, x):
        return [self.logits, self.logits[:, :, ::2, ::2, ::2]]


def test_perfect_prediction_has_near_zero_loss():
    images = np.random.default_rng(0).normal(size=(2, 1, 8, 16, 16)).astype(np.float32)
    batch = VolumeFusion.make_batch(CFG, images, np.random.default_rng(0))
    method = VolumeFusion(CFG, nn.Identity(), (8, 16, 16), 1)
    terms = method.forward_loss(_Oracle(batch["target"], CFG.K), batch)
    assert set(terms) == {"ce", "dice", "loss"}
    assert terms["ce"].item() < 1e-6 and abs(terms["dice"].item()) < 1e-4 and terms["loss"].item() < 1e-4
    uniform = method.forward_loss(lambda x: torch.zeros(2, CFG.K + 1, 8, 16, 16), batch)
    assert uniform["ce"].item() == pytest.approx(np.log(CFG.K + 1), rel=1e-5)
    assert uniform["loss"].item() > 0.5


def test_loss_decreases_when_overfitting_one_batch():
    # Three constant 2-channel crops at the corners of a triangle: a fused voxel of sample i
    # lies on the edge p_i -> p_(i+1) at fraction α, so a tiny conv net can learn every class
    # (only pure corners are ambiguous between label 0 and K). On noise crops the pretext task
    # needs context that a 2-layer net does not have.
    torch.manual_seed(0)
    torch.set_num_threads(1)
    corners = np.array([[-1, -1], [2, -1], [-1, 2]], np.float32)
    images = np.broadcast_to(corners[:, :, None, None, None], (3, 2, 8, 16, 16)).copy()
    batch = VolumeFusion.make_batch(CFG, images, np.random.default_rng(1))
    net = nn.Sequential(nn.Conv3d(2, 32, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(32, CFG.K + 1, 3, padding=1))
    method = VolumeFusion(CFG, net, (8, 16, 16), 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = method.forward_loss(net, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
