"""Volume Fusion: the box draw, label painting, fusion arithmetic, batch pairing (two different scans),
flips, padding without loss, and the loss."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from nnssl.errors import NnsslError
from nnssl.ssl import METHODS
from nnssl.ssl.volume_fusion import VolumeFusion, VolumeFusionConfig
from nnssl.transforms.volume_fusion import (FusionDraw, apply_fusion, draw_flips, draw_fusion_boxes,
                                            draw_fusion_cases, flip_crops, fuse, paint_label_map,
                                            scaled_box_size_range, volume_fusion_batch)

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
    cfg = VolumeFusionConfig()
    assert (cfg.flip_prob, cfg.ignore_padding, cfg.transfer, cfg.grad_clip) == (0.5, True, "encoder+decoder", None)
    assert VolumeFusion.transfer == "encoder+decoder"
    for bad in ({"K": 0}, {"K": 255}, {"min_boxes": 5, "max_boxes": 2}, {"box_size_min": (50, 8, 8)},
                {"reference_patch": (64, 128)}, {"flip_prob": 1.5}, {"transfer": "decoder"}, {"grad_clip": 0.0}):
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
    _flip_of(vols[0][None], images[0])  # the crops as fused: flipped versions of the inputs
    _flip_of(vols[1][None], images[1])
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


# --- two different scans per fused sample ---

@pytest.mark.parametrize("n_cases, batch", [(2, 2), (2, 4), (3, 2), (3, 4), (3, 5), (4, 4), (5, 3), (9, 4)])
def test_fusion_cases_never_pair_a_scan_with_itself(n_cases, batch):
    rng = np.random.default_rng(0)
    for _ in range(200):
        cases = draw_fusion_cases(rng, n_cases, batch)
        assert cases.shape == (batch,) and cases.min() >= 0 and cases.max() < n_cases
        assert all(cases[i] != cases[(i + 1) % batch] for i in range(batch))  # background != foreground scan
        if n_cases >= batch:
            assert len(set(cases.tolist())) == batch  # every sample a different scan
        else:  # each scan used floor(B / n) or ceil(B / n) times
            counts = np.bincount(cases, minlength=n_cases)
            assert counts.min() >= batch // n_cases and counts.max() <= -(-batch // n_cases)


def test_fusion_cases_uniform_over_ordered_pairs():
    rng = np.random.default_rng(1)
    pairs = [tuple(draw_fusion_cases(rng, 4, 2).tolist()) for _ in range(6000)]
    counts = np.array([pairs.count(p) for p in itertools.permutations(range(4), 2)])
    assert counts.sum() == 6000 and (np.abs(counts / 6000 - 1 / 12) < 0.015).all()  # 12 ordered pairs


def test_fusion_cases_refuse_data_that_cannot_pair():
    with pytest.raises(NnsslError, match="at least 2"):
        draw_fusion_cases(np.random.default_rng(0), 1, 2)
    with pytest.raises(NnsslError, match="even --batch_size"):  # a 3-cycle over 2 scans repeats one
        draw_fusion_cases(np.random.default_rng(0), 2, 3)
    assert sorted(VolumeFusion.draw_cases(CFG, 3, 3, np.random.default_rng(0)).tolist()) == [0, 1, 2]
    with pytest.raises(NnsslError, match="at least 2"):  # refused in prepare, before anything is written
        VolumeFusion.prepare(CFG, "unused", ["only_case"], seed=0)
    with pytest.raises(NnsslError, match="even --batch_size"):
        VolumeFusion.prepare(dataclasses.replace(CFG, batch_size=3), "unused", ["a", "b"], seed=0)
    assert VolumeFusion.prepare(CFG, "unused", ["a", "b"], seed=0) is CFG


# --- flips before fusion ---

def test_flip_draws_follow_the_configured_probability():
    rng = np.random.default_rng(2)
    for p in (0.0, 0.3, 0.5, 1.0):
        flips = draw_flips(rng, 4000, p)
        assert flips.shape == (4000, 3) and flips.dtype == bool
        assert np.abs(flips.mean(0) - p).max() < 0.03
    flips = draw_flips(rng, 8000, 0.5)  # the three axes are drawn independently
    assert abs((flips[:, 0] & flips[:, 1]).mean() - 0.25) < 0.02


def test_flip_crops_by_hand():
    images = np.arange(2 * 1 * 8 * 3 * 4, dtype=np.float32).reshape(2, 1, 8, 3, 4)
    regions = np.array([[[2, 5], [0, 3], [1, 4]], [[0, 8], [0, 3], [0, 4]]])
    flips = np.array([[True, False, True], [False, False, False]])
    out, new_regions = flip_crops(images, regions, flips)
    np.testing.assert_array_equal(out[0], images[0, :, ::-1, :, ::-1])
    np.testing.assert_array_equal(out[1], images[1])
    assert new_regions.tolist() == [[[3, 6], [0, 3], [0, 3]], [[0, 8], [0, 3], [0, 4]]]  # [lo, hi) -> [n-hi, n-lo)
    assert regions[0, 0].tolist() == [2, 5] and images[0, 0, 0, 0, 0] == 0  # inputs untouched


def _ramps(b, shape=(4, 4, 4)):
    """[b, 1, *shape] crops whose value encodes the position, so every flip gives a different array."""
    d, h, w = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    base = (100 * d + 10 * h + w).astype(np.float32)
    return np.stack([base + 1000 * i for i in range(b)])[:, None]


def _flip_of(crop, original):
    """The axes (D, H, W) along which ``crop`` [C, D, H, W] is ``original`` flipped, found by search."""
    for f in itertools.product([False, True], repeat=3):
        axes = tuple(a + 1 for a in range(3) if f[a])
        if np.array_equal(crop, np.flip(original, axes) if axes else original):
            return f
    raise AssertionError("not a flip of the original")


def test_make_batch_flips_each_axis_with_the_configured_probability():
    no_boxes = dataclasses.replace(CFG, min_boxes=0, max_boxes=0)  # label 0 everywhere: data = background
    images = _ramps(2)
    rng = np.random.default_rng(3)
    for p in (0.0, 1.0, 0.3):
        cfg = dataclasses.replace(no_boxes, flip_prob=p)
        seen = np.array([[_flip_of(VolumeFusion.make_batch(cfg, images, rng)["data"][i].numpy(), images[i])
                          for i in range(2)] for _ in range(300)]).reshape(-1, 3)
        assert np.abs(seen.mean(0) - p).max() < 0.06, (p, seen.mean(0))


def test_fusion_uses_the_flipped_crops():
    cfg = dataclasses.replace(CFG, flip_prob=1.0)
    images = _ramps(2)
    fused, labels = volume_fusion_batch(images, np.random.default_rng(4), cfg)
    flipped = images[:, :, ::-1, ::-1, ::-1]
    alpha = labels[0, 0] / cfg.K
    assert 0 < alpha.mean() < 1
    np.testing.assert_allclose(fused[0, 0], (1 - alpha) * flipped[0, 0] + alpha * flipped[1, 0], atol=1e-3)


# --- padding carries no loss ---

def test_padding_of_either_crop_is_marked_and_flipped_with_it():
    images = np.random.default_rng(5).normal(size=(3, 1, 8, 6, 6)).astype(np.float32)
    regions = [[[2, 8], [0, 6], [0, 6]], [[0, 8], [0, 6], [0, 6]], [[0, 8], [0, 6], [1, 5]]]
    meta = {"image_region": regions}
    ignore = CFG.K + 1
    cfg = dataclasses.replace(CFG, flip_prob=0.0)
    target = VolumeFusion.make_batch(cfg, images, np.random.default_rng(6), meta)["target"][:, 0].numpy()
    padded = np.zeros((3, 8, 6, 6), bool)
    padded[0, :2] = True  # sample 0: its own (background) padding
    padded[1, :, :, [0, 5]] = True  # sample 1: its foreground (sample 2) is padding there
    padded[2, :2] = True  # sample 2: its foreground is sample 0 ...
    padded[2, :, :, [0, 5]] = True  # ... plus its own padding
    np.testing.assert_array_equal(target == ignore, padded)
    assert target[~padded].max() <= CFG.K
    flipped = VolumeFusion.make_batch(dataclasses.replace(CFG, flip_prob=1.0), images, np.random.default_rng(6), meta)
    assert (flipped["target"][0, 0, 6:] == ignore).all() and (flipped["target"][0, 0, :6] != ignore).all()
    off = VolumeFusion.make_batch(dataclasses.replace(cfg, ignore_padding=False), images, np.random.default_rng(6),
                                  meta)
    assert off["target"].max() <= CFG.K


def test_padded_voxels_do_not_change_the_loss():
    images = np.random.default_rng(7).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
    meta = {"image_region": [[[0, 5], [0, 8], [0, 8]], [[0, 8], [0, 8], [0, 8]]]}
    batch = VolumeFusion.make_batch(dataclasses.replace(CFG, flip_prob=0.0), images, np.random.default_rng(8), meta)
    padded = batch["target"][:, 0] == CFG.K + 1
    assert padded[:, 5:].all() and not padded[:, :5].any()
    method = VolumeFusion(CFG, nn.Identity(), (8, 8, 8), 1)
    clean = torch.where(padded[:, None], torch.zeros_like(batch["target"]), batch["target"])
    oracle = _Oracle(clean, CFG.K).logits
    garbage = oracle.clone()
    garbage[:, :, 5:] = torch.randn(2, CFG.K + 1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 50
    for logits in (oracle, garbage):  # garbage: wrong wherever it is padding
        terms = method.forward_loss(lambda x, z=logits: z, batch)
        assert terms["ce"].item() < 1e-6 and abs(terms["dice"].item()) < 1e-4
    uniform = method.forward_loss(lambda x: torch.zeros(2, CFG.K + 1, 8, 8, 8), batch)
    assert uniform["ce"].item() == pytest.approx(np.log(CFG.K + 1), rel=1e-5)  # a mean over counted voxels only
