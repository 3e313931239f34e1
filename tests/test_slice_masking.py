"""Masked slice chains: chain statistics, patch masking, clipping, exact application of a fixed draw."""
import dataclasses

import numpy as np
import pytest

from nnssl.ssl.masked_kmeans import MaskedKMeansConfig
from nnssl.transforms.slice_masking import SliceMaskDraw, apply_slice_mask, chain_slices, draw_slice_mask

CFG = MaskedKMeansConfig()


def test_chain_end_rate_and_chain_membership():
    rng = np.random.default_rng(0)
    d_, m = 200, CFG.chain_length
    draws = [draw_slice_mask(rng, (d_, 4, 4), CFG) for _ in range(1000)]
    ends = np.stack([d.chain_ends for d in draws])
    masked = np.stack([d.masked_slices for d in draws])
    assert abs(ends.mean() - CFG.chain_end_prob) < 0.003
    # Exact rule: slice d is masked iff a chain end lies in d..d+M-1 (clipped at the last slice).
    for dr in draws[:20]:
        expected = [dr.chain_ends[d:d + m].any() for d in range(d_)]
        assert dr.masked_slices.tolist() == expected
    # Away from the crop's end, P(slice in a chain) = 1 - (1 - φ1)^M.
    assert abs(masked[:, :d_ - m].mean() - (1 - (1 - CFG.chain_end_prob) ** m)) < 0.01
    # Every chain (maximal run) is at least M long unless clipped at slice 0, and ends on a chain end.
    for dr in draws[:200]:
        runs = np.flatnonzero(np.diff(np.concatenate([[0], dr.masked_slices.astype(int), [0]])))
        for start, stop in zip(runs[::2], runs[1::2]):
            assert stop - start >= m or start == 0
            assert dr.chain_ends[stop - 1]


def test_patch_size_choice_and_patch_masking_rate():
    rng = np.random.default_rng(1)
    draws = [draw_slice_mask(rng, (40, 96, 96), CFG) for _ in range(150)]
    sizes = np.concatenate([d.patch_size[d.masked_slices] for d in draws])
    assert (np.concatenate([d.patch_size[~d.masked_slices] for d in draws]) == 0).all()
    freq = np.array([(sizes == p).mean() for p in CFG.patch_sizes])
    assert np.abs(freq - 1 / len(CFG.patch_sizes)).max() < 0.025
    rates = np.concatenate([d.voxel_mask()[d.masked_slices].reshape(-1) for d in draws])
    assert abs(rates.mean() - CFG.patch_mask_prob) < 0.02
    # Per patch size: each patch (not each voxel) is a Bernoulli(φ2): mask constant on P×P tiles.
    for dr in draws[:10]:
        vm = dr.voxel_mask()
        for d in np.flatnonzero(dr.masked_slices):
            p = int(dr.patch_size[d])
            tiles = vm[d].reshape(96 // p, p, 96 // p, p)
            assert (tiles == tiles[:, :1, :, :1]).all()


def test_patch_sizes_clipped_to_slice():
    cfg = dataclasses.replace(CFG, patch_sizes=(96,), chain_end_prob=0.5)
    rng = np.random.default_rng(2)
    whole = []
    for _ in range(300):
        dr = draw_slice_mask(rng, (6, 16, 12), cfg)
        assert (dr.patch_size[dr.masked_slices] == 16).all()
        vm = dr.voxel_mask()
        for d in np.flatnonzero(dr.masked_slices):
            assert dr.patch_grids[d].shape == (1, 1)
            assert vm[d].all() or not vm[d].any()  # one patch = the whole slice
            whole.append(vm[d].all())
    assert abs(np.mean(whole) - cfg.patch_mask_prob) < 0.06
    # A non-dividing patch size: the last row/column are partial (16 = 8 + 8, 12 = 8 + 4).
    dr = draw_slice_mask(np.random.default_rng(3), (6, 16, 12), dataclasses.replace(cfg, patch_sizes=(8,)))
    assert all(g.shape == (2, 2) for g in dr.patch_grids.values())


def test_fixed_draw_gives_exact_mask_and_touches_only_chain_slices():
    grid = np.array([[True, False, False], [False, True, True]])
    draw = SliceMaskDraw(shape=(3, 4, 5), chain_ends=np.array([False, True, False]),
                         masked_slices=np.array([True, True, False]), patch_size=np.array([4, 2, 0]),
                         patch_grids={0: np.array([[False, True]]), 1: grid})
    expected = np.zeros((3, 4, 5), bool)
    expected[0, :, 4:] = True  # P=4 on 4x5: patches [:, 0:4] (kept) and [:, 4:5] (masked, partial)
    expected[1, 0:2, 0:2] = True
    expected[1, 2:4, 2:5] = True  # partial last column
    assert (draw.voxel_mask() == expected).all()

    x = np.random.default_rng(4).normal(size=(2, 2, 3, 4, 5)).astype(np.float32)
    x_before = x.copy()
    other = SliceMaskDraw((3, 4, 5), np.zeros(3, bool), np.zeros(3, bool), np.zeros(3, int), {})
    out, voxel, slices = apply_slice_mask(x, [draw, other], mask_value=-7.0)
    assert (x == x_before).all()  # input untouched
    assert (voxel[0] == expected).all() and not voxel[1].any()
    assert slices.tolist() == [[True, True, False], [False, False, False]]
    assert (out[0][:, expected] == -7.0).all()
    assert (out[0][:, ~expected] == x[0][:, ~expected]).all()
    assert (out[1] == x[1]).all()
    single, v1, s1 = apply_slice_mask(x[0], draw, mask_value=-7.0)
    assert (single == out[0]).all() and (v1 == expected).all() and s1.tolist() == [True, True, False]


def test_unchained_slices_bit_identical_on_random_draws():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(3, 2, 30, 20, 24)).astype(np.float32)
    draws = [draw_slice_mask(rng, images.shape[2:], CFG) for _ in range(3)]
    out, voxel, slices = apply_slice_mask(images, draws)
    for b in range(3):
        assert slices[b].any()  # seed chosen so every sample has a chain
        free = ~slices[b]
        assert np.array_equal(out[b][:, free], images[b][:, free])
        assert not voxel[b][free].any()
        assert (out[b][:, voxel[b]] == 0).all()


def test_draw_is_deterministic_and_mismatched_draw_rejected():
    a = draw_slice_mask(np.random.default_rng(7), (20, 8, 8), CFG)
    b = draw_slice_mask(np.random.default_rng(7), (20, 8, 8), CFG)
    assert (a.voxel_mask() == b.voxel_mask()).all() and (a.patch_size == b.patch_size).all()
    with pytest.raises(ValueError):
        apply_slice_mask(np.zeros((1, 21, 8, 8), np.float32), a)
    assert chain_slices(np.array([0, 0, 1, 0, 0, 0, 1], bool), 3).tolist() == [1, 1, 1, 0, 1, 1, 1]
