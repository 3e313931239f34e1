"""HybridMIM's two-level masking and reconstruction region (nnssl.transforms.hybrid_masking)."""
import numpy as np
import pytest

from nnssl.errors import NnsslError
from nnssl.transforms.hybrid_masking import (apply_patch_mask, check_region, default_region, draw_patch_mask,
                                             group_by_sub_volume, hybrid_mask, mask_geometry, region_offsets,
                                             voxel_mask)

PAPER = mask_geometry((96, 96, 96), (32, 32, 32), (16, 16, 16))


def test_paper_geometry():
    assert PAPER.grid == (3, 3, 3) and PAPER.n_sub_volumes == 27
    assert PAPER.split == (2, 2, 2) and PAPER.patches_per_sub_volume == 8 and PAPER.patch_grid == (6, 6, 6)
    # 128^3 (BraTS): still 32^3 sub-volumes, R = 64
    assert mask_geometry((128, 128, 128), (32, 32, 32), (16, 16, 16)).n_sub_volumes == 64


@pytest.mark.parametrize("sampling", ["exact", "bernoulli"])
def test_achieved_ratio_over_many_draws(sampling):
    rng = np.random.default_rng(0)
    ratios = [draw_patch_mask(rng, PAPER, 0.4, sampling).mean() for _ in range(400)]
    assert abs(np.mean(ratios) - 0.4) <= 0.02
    if sampling == "exact":  # round(0.4 * 216) = 86 patches every time
        assert set(np.round(np.array(ratios) * 216).astype(int)) == {86}


def test_counts_and_locations_agree_with_the_mask_voxel_by_voxel():
    geometry = mask_geometry((64, 32, 96), (32, 32, 32), (16, 16, 16))
    rng = np.random.default_rng(3)
    images = (1.0 + rng.random((2, 2, 64, 32, 96))).astype(np.float32)  # never 0 before masking
    masked, patch_masks, counts, locations = hybrid_mask(images, rng, geometry, 0.4)
    assert counts.shape == (2, 6) and locations.shape == (2, 6, 8)
    for b in range(2):
        for r, (i, j, k) in enumerate(np.ndindex(2, 1, 3)):  # sub-volumes in raster order
            bits = []
            for u, v, w in np.ndindex(2, 2, 2):  # patches of the sub-volume in raster order
                d, h, x = 32 * i + 16 * u, 32 * j + 16 * v, 32 * k + 16 * w
                block, orig = masked[b, :, d:d + 16, h:h + 16, x:x + 16], images[b, :, d:d + 16, h:h + 16, x:x + 16]
                if (block == 0).all():
                    bits.append(True)
                else:
                    assert np.array_equal(block, orig)
                    bits.append(False)
            assert list(locations[b, r]) == bits
            assert counts[b, r] == sum(bits)


def test_grouping_is_spatial_not_raster():
    """A mask confined to one 32^3 block gives a non-zero count for exactly that sub-volume; grouping the
    patch grid by raster index (8 consecutive patches, the authors' code) would spread it over several."""
    vox = np.zeros((96, 96, 96), dtype=bool)
    vox[32:64, 0:32, 64:96] = True  # sub-volume (1, 0, 2)
    patch_mask = vox[::16, ::16, ::16]  # one voxel per 16^3 patch
    assert np.array_equal(voxel_mask(patch_mask, PAPER), vox)
    counts = group_by_sub_volume(patch_mask, PAPER).sum(-1)
    assert np.flatnonzero(counts).tolist() == [1 * 9 + 0 * 3 + 2] and counts[11] == 8
    raster_counts = patch_mask.reshape(-1, 8).sum(-1)
    assert np.count_nonzero(raster_counts) > 1


def test_apply_patch_mask_sets_every_channel_to_the_value():
    geometry = mask_geometry((32, 32, 32), (32, 32, 32), (16, 16, 16))
    images = np.ones((1, 2, 32, 32, 32), np.float32)
    pm = np.zeros((1, 2, 2, 2), bool)
    pm[0, 1, 0, 1] = True
    out = apply_patch_mask(images, pm, geometry, value=-3.0)
    assert (out[:, :, 16:, :16, 16:] == -3).all() and out.sum() == 2 * (32 ** 3 - 16 ** 3) - 3 * 2 * 16 ** 3
    assert images.min() == 1  # input untouched


def test_short_axis_is_one_sub_volume_with_the_same_split():
    g = mask_geometry((16, 32, 64), (32, 32, 32), (16, 16, 16))
    assert g.sub_volume == (16, 32, 32) and g.patch == (8, 16, 16) and g.grid == (1, 1, 2)


def test_crop_not_divisible_names_valid_sizes():
    with pytest.raises(NnsslError, match=r"64 or 96"):
        mask_geometry((80, 96, 96), (32, 32, 32), (16, 16, 16))
    with pytest.raises(NnsslError, match="multiple of 2"):
        mask_geometry((15, 32, 32), (32, 32, 32), (16, 16, 16))
    with pytest.raises(NnsslError, match="whole number of patch_size"):
        mask_geometry((96, 96, 96), (32, 32, 32), (12, 16, 16))


def test_region_defaults_follow_the_paper():
    assert default_region(PAPER) == (64, 64, 64)
    assert default_region(mask_geometry((128, 128, 128), (32, 32, 32), (16, 16, 16))) == (96, 96, 96)
    assert default_region(mask_geometry((16, 32, 64), (32, 32, 32), (16, 16, 16))) == (16, 32, 32)


def test_region_checks():
    with pytest.raises(NnsslError, match="larger than the crop"):
        check_region((96, 96, 96), (128, 64, 64), (16, 16, 16))
    with pytest.raises(NnsslError, match="Valid region sizes along this axis: 32, 64, 96"):
        check_region((96, 96, 96), (48, 64, 64), (32, 32, 32))
    check_region((96, 96, 96), (64, 64, 64), (16, 16, 16))


def test_region_offsets_centred_or_half_way_coin():
    # stride 16: the centred start 16 is aligned
    assert region_offsets((96, 96, 96), (64, 64, 64), (16, 16, 16), (0.9, 0.1, 0.5)) == (16, 16, 16)
    # stride 32: 16 lies half-way between 0 and 32; the coin picks
    assert region_offsets((96, 96, 96), (64, 64, 64), (32, 32, 32), (0.1, 0.7, 0.5)) == (0, 32, 32)
    assert region_offsets((96, 64, 32), (32, 64, 32), (32, 32, 32), (0.9, 0.9, 0.9)) == (32, 0, 0)
