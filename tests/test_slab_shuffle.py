"""LWI's transformation module (nnssl.transforms.slab_shuffle): slab shuffle, labels, patch masking."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from nnssl.errors import NnsslError
from nnssl.transforms.slab_shuffle import (check_slabs, draw_patch_mask, draw_slab_permutation, patch_mask_voxels,
                                           scaled_patch_size, shuffle_and_mask, shuffle_slabs, unshuffle_slabs)

CFG = SimpleNamespace(mask_ratio=0.4, mask_patch_size=(16, 16, 16), reference_crop=(96, 96, 96), mask_value=0.0)


def depth_ramp(c=1, d=6, h=2, w=3):
    """[c, d, h, w] whose every voxel holds its depth index (so slab moves are readable)."""
    return np.broadcast_to(np.arange(d, dtype=np.float32)[None, :, None, None], (c, d, h, w)).copy()


def test_shuffle_moves_whole_slabs_by_hand():
    # D = 6, B = 3 slabs of 2 slices; perm [2, 0, 1]: position 0 gets slab 2 (slices 4, 5), ...
    out = shuffle_slabs(depth_ramp(), np.array([2, 0, 1]))
    assert out[0, :, 0, 0].tolist() == [4, 5, 0, 1, 2, 3]
    assert (out == out[:, :, :1, :1]).all()  # only the depth axis moved


def test_shuffle_then_inverse_is_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 3, 4)).astype(np.float32)
    for b in (2, 3, 4, 6, 12):
        perm = draw_slab_permutation(rng, b)
        assert np.array_equal(unshuffle_slabs(shuffle_slabs(x, perm), perm), x)
        if not np.array_equal(perm, np.arange(b)):
            assert not np.array_equal(shuffle_slabs(x, perm), x)


def test_permutations_are_uniform():
    rng = np.random.default_rng(1)
    counts = {}
    for _ in range(3000):
        key = tuple(draw_slab_permutation(rng, 3))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == set(itertools.permutations(range(3)))
    assert all(abs(n / 3000 - 1 / 6) < 0.03 for n in counts.values())


def test_labels_equal_the_permutation_per_sample():
    """Slab k of every crop is constant k + 1: after the transform, position j holds order[j] + 1,
    i.e. label[j] = original index of the slab now at j; every sample has its own permutation."""
    b, n = 4, 16
    images = np.broadcast_to((np.repeat(np.arange(b), 3) + 1.0).astype(np.float32)[None, None, :, None, None],
                             (n, 1, 12, 5, 5)).copy()
    cfg = SimpleNamespace(**{**vars(CFG), "mask_ratio": 0.0})
    masked, aux = shuffle_and_mask(images, np.random.default_rng(2), b, cfg)
    order = aux["order"]
    assert order.shape == (n, b) and order.dtype == np.int64
    for i in range(n):
        assert sorted(order[i].tolist()) == list(range(b))
        for j in range(b):
            assert (masked[i, 0, 3 * j:3 * j + 3] == order[i, j] + 1).all()
    assert np.array_equal(masked, aux["target"])  # ratio 0: nothing masked
    assert len({tuple(o) for o in order.tolist()}) > 1


def test_scaled_patch_size_by_hand():
    assert scaled_patch_size((96, 96, 96), (16, 16, 16), (96, 96, 96)) == (16, 16, 16)
    assert scaled_patch_size((64, 128, 128), (16, 16, 16), (96, 96, 96)) == (11, 21, 21)  # 10.67, 21.33
    assert scaled_patch_size((16, 32, 32), (16, 16, 16), (96, 96, 96)) == (3, 5, 5)  # 2.67, 5.33
    assert scaled_patch_size((2, 4, 4), (16, 16, 16), (96, 96, 96)) == (1, 1, 1)  # at least 1


def test_patch_mask_voxels_by_hand():
    grid = np.array([[[True, False]], [[False, True]]])  # 2 x 1 x 2 patches of (2, 3, 2)
    vox = patch_mask_voxels(grid, (2, 3, 2), (3, 3, 4))  # last depth patch partial (1 slice)
    assert vox.shape == (3, 3, 4)
    assert vox[0:2, :, 0:2].all() and not vox[0:2, :, 2:4].any()
    assert not vox[2, :, 0:2].any() and vox[2, :, 2:4].all()


def test_masking_ratio_over_many_draws():
    rng = np.random.default_rng(3)
    shape = (24, 40, 56)  # not divisible by the patch: partial edge patches
    patch = scaled_patch_size(shape, CFG.mask_patch_size, CFG.reference_crop)  # (4, 7, 9)
    ratios = []
    for _ in range(300):
        grid = draw_patch_mask(rng, shape, patch, 0.4)
        assert grid.shape == (6, 6, 7) and grid.sum() == round(0.4 * 6 * 6 * 7)  # exact patch count
        ratios.append(patch_mask_voxels(grid, patch, shape).mean())
    assert abs(np.mean(ratios) - 0.4) < 0.02
    assert np.std(ratios) > 0  # masks differ between draws


def test_mask_is_applied_after_the_shuffle():
    """Every voxel is non-zero, so the zeros of the input are exactly the mask; they sit where the mask is in
    the *shuffled* frame (masking before the shuffle would put them at the shuffled mask's places)."""
    rng = np.random.default_rng(4)
    images = (np.arange(2 * 1 * 12 * 12 * 12, dtype=np.float32) + 1).reshape(2, 1, 12, 12, 12)
    masked, aux = shuffle_and_mask(images, rng, 3, CFG)
    for i in range(2):
        shuffled = shuffle_slabs(images[i], aux["order"][i])
        assert np.array_equal(aux["target"][i], shuffled)
        mask = aux["mask"][i]
        assert np.array_equal(masked[i, 0] == 0, mask)
        assert np.array_equal(masked[i, 0][~mask], shuffled[0][~mask])
    moved = [i for i in range(2) if not np.array_equal(shuffle_slabs(aux["mask"][i][None], aux["order"][i])[0],
                                                       aux["mask"][i])]
    assert moved  # the test can tell the two orders apart


def test_masks_differ_per_sample():
    images = np.ones((4, 1, 12, 24, 24), np.float32)
    _, aux = shuffle_and_mask(images, np.random.default_rng(5), 2, CFG)
    assert len({aux["mask"][i].tobytes() for i in range(4)}) == 4


def test_depth_that_does_not_split_into_slabs_is_refused():
    with pytest.raises(NnsslError, match="multiple of 4"):
        check_slabs(10, 4)
    with pytest.raises(NnsslError, match="B >= 2"):
        check_slabs(8, 1)
    with pytest.raises(NnsslError, match="3D crops"):
        shuffle_and_mask(np.zeros((1, 8, 8, 8), np.float32), np.random.default_rng(0), 2, CFG)
