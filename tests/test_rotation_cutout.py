"""Rotation and cutout views (swin_pretext's augmentation), without a network."""
import numpy as np
import pytest

from nnssl.errors import NnsslError
from nnssl.transforms.rotation_cutout import (apply_cutouts, box_mask, cutout_side_range, draw_cutouts, draw_rotation,
                                              rotate)


def test_rotation_labels_are_uniform_over_all_four_classes():
    rng = np.random.default_rng(0)
    counts = np.bincount([draw_rotation(rng) for _ in range(8000)], minlength=5)
    assert counts[4] == 0  # only 0..3
    # 2000 expected per class, binomial std ~39: 5 std either way
    assert np.all(np.abs(counts[:4] - 2000) < 200), counts


def test_rotation_is_exact_and_in_the_axial_plane():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)  # [C, D, H, W]
    for k in range(4):
        assert np.array_equal(rotate(rotate(x, k), 4 - k), x)
    assert np.array_equal(rotate(x, 4), x)
    # hand-computed: a 2x2 plane [[1, 2], [3, 4]] turned by 90 degrees (counter-clockwise) in (H, W)
    y = np.array([[[[1, 2], [3, 4]]]], dtype=np.float32)
    assert np.array_equal(rotate(y, 1)[0, 0], [[2, 4], [1, 3]])
    assert np.array_equal(rotate(y, 2)[0, 0], [[4, 3], [2, 1]])
    # depth (slice) axis untouched: each slice is rotated on its own
    assert np.array_equal(rotate(x, 1)[:, 2], np.rot90(x[:, 2], 1, axes=(1, 2)))
    # another plane when asked: D and W (spatial axes 0 and 2)
    z = np.zeros((1, 4, 3, 4), np.float32)
    z[0, 0, :, 3] = 1  # voxels at depth 0, width 3
    assert rotate(z, 1, plane=(0, 2))[0, 0, :, 0].tolist() == [1, 1, 1]


def test_rotation_refuses_non_square_planes():
    with pytest.raises(NnsslError, match="square_crop"):
        rotate(np.zeros((1, 8, 8, 6), np.float32), 1)


def test_cutout_side_ranges_scale_with_the_crop():
    assert cutout_side_range((96, 96, 96)) == [(32, 64)] * 3
    assert cutout_side_range((48, 192, 96)) == [(16, 32), (64, 128), (32, 64)]
    assert cutout_side_range((32, 64, 64)) == [(11, 21), (21, 43), (21, 43)]  # 32·32/96 = 10.67 -> 11
    assert cutout_side_range((2, 2, 2)) == [(1, 1)] * 3


def test_cutout_counts_and_sizes_stay_in_range_and_inside_the_crop():
    rng = np.random.default_rng(1)
    shape = (32, 64, 48)
    ranges = cutout_side_range(shape)
    n_boxes = []
    for _ in range(500):
        boxes = draw_cutouts(rng, shape)
        n_boxes.append(len(boxes))
        for box in boxes:
            for (lo, hi), n, (smin, smax) in zip(box, shape, ranges):
                assert 0 <= lo < hi <= n and smin <= hi - lo <= smax
    assert set(n_boxes) == {1, 2, 3}


def test_cutout_fills_boxes_with_noise_in_range_and_keeps_the_rest():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 8, 8)).astype(np.float32)
    boxes = [((0, 2), (1, 4), (2, 8)), ((5, 8), (5, 8), (0, 3))]
    mask = box_mask(x.shape[1:], boxes)
    assert mask.sum() == 2 * 3 * 6 + 3 * 3 * 3
    out = apply_cutouts(x, boxes, rng)
    assert np.array_equal(out[:, ~mask], x[:, ~mask])
    inside = out[:, mask]
    assert inside.min() >= x.min() and inside.max() <= x.max()  # the crop's own range (default)
    assert not np.any(inside == x[:, mask])
    fixed = apply_cutouts(x, boxes, rng, low=5.0, high=6.0)[:, mask]
    assert fixed.min() >= 5.0 and fixed.max() < 6.0
    assert np.array_equal(x, apply_cutouts(x, [], rng))  # no box: a copy of the crop
