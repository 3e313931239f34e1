"""HD95 / ASSD against hand-computed values and an independent brute-force implementation."""
import itertools

import numpy as np
import pytest

from nnssl.evaluation.surface import assd, hd95, hd95_and_assd, surface_distances


def brute_force_surface(mask):
    """Surface voxels by checking every face neighbour explicitly (outside the array = background)."""
    pts = []
    for idx in map(tuple, np.argwhere(mask)):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            n = list(idx)
            n[axis] += step
            if not (0 <= n[axis] < mask.shape[axis]) or not mask[tuple(n)]:
                pts.append(idx)
                break
    return np.array(pts, dtype=float)


def brute_force_distances(pred, ref, spacing):
    """All pairwise surface-voxel distances (mm), minimised: no distance transform involved."""
    sp, sr = brute_force_surface(pred) * spacing, brute_force_surface(ref) * spacing
    pair = np.linalg.norm(sp[:, None, :] - sr[None, :, :], axis=-1)  # [N_pred, N_ref]
    return pair.min(axis=1), pair.min(axis=0)


def brute_force_metrics(pred, ref, spacing):
    d_pr, d_rp = brute_force_distances(pred, ref, np.asarray(spacing, float))
    return max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)), np.concatenate([d_pr, d_rp]).mean()


def cube(shape, start, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def test_two_voxel_cubes_shifted_along_z_closed_form():
    # 2x2x2 cubes, the prediction shifted by k=2 voxels along z (axis 0). Every voxel of a
    # 2-cube is a surface voxel. Reference slices z=0,1; prediction slices z=2,3. The nearest
    # surface voxel is always the one with the same (y, x):
    #   ref z=0 -> pred z=2: 2*sz,  ref z=1 -> pred z=2: 1*sz   (4 voxels each)
    #   pred z=2 -> ref z=1: 1*sz,  pred z=3 -> ref z=1: 2*sz   (4 voxels each)
    # sz=3.0: each direction is [3,3,3,3,6,6,6,6]; P95 (linear, index 0.95*7=6.65) = 6.0,
    # ASSD = (8*3 + 8*6)/16 = 4.5.
    ref, pred = cube((6, 4, 4), (0, 1, 1), 2), cube((6, 4, 4), (2, 1, 1), 2)
    assert hd95(pred, ref, (3.0, 0.8, 0.8)) == pytest.approx(6.0)
    assert assd(pred, ref, (3.0, 0.8, 0.8)) == pytest.approx(4.5)
    d_pr, d_rp = surface_distances(pred, ref, (3.0, 0.8, 0.8))
    assert sorted(d_pr) == pytest.approx([3.0] * 4 + [6.0] * 4)
    assert sorted(d_rp) == pytest.approx([3.0] * 4 + [6.0] * 4)
    # Swapping the spacing (z now 0.8 mm, y/x 3.0 mm) scales the z shift: 2*0.8 and 1*0.8.
    assert hd95(pred, ref, (0.8, 3.0, 3.0)) == pytest.approx(1.6)
    assert assd(pred, ref, (0.8, 3.0, 3.0)) == pytest.approx(1.2)


@pytest.mark.parametrize("spacing", [(3.0, 0.8, 0.8), (0.8, 0.8, 3.0), (1.0, 1.0, 1.0)])
def test_shifted_cubes_match_brute_force(spacing):
    # 5-cubes shifted by 2 along z: faces, edges and interior voxels all occur.
    ref, pred = cube((10, 8, 8), (1, 1, 1), 5), cube((10, 8, 8), (3, 1, 1), 5)
    h, a = hd95_and_assd(pred, ref, spacing)
    bh, ba = brute_force_metrics(pred, ref, spacing)
    assert h == pytest.approx(bh) and a == pytest.approx(ba)
    assert h > 0 and a > 0


def test_random_masks_touching_the_border_match_brute_force():
    # Dense masks have interior voxels and concave notches, where a face-neighbour surface
    # differs from e.g. a 26-neighbour one; sparse masks are almost all surface.
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.7, 1.1)
    for density in (0.35, 0.8, 0.9):
        pred, ref = rng.random((7, 6, 8)) < density, rng.random((7, 6, 8)) < density
        h, a = hd95_and_assd(pred, ref, spacing)
        bh, ba = brute_force_metrics(pred, ref, spacing)
        assert h == pytest.approx(bh) and a == pytest.approx(ba)


def test_notched_cube_uses_face_neighbour_surface():
    # A 5-cube missing its corner voxel (0,0,0) and a 5-cube shifted by one voxel along z.
    # Voxel (1,1,1) of the notched cube only touches the notch diagonally, so it is not a
    # surface voxel (a 26-neighbour surface definition would include it).
    ref = cube((8, 7, 7), (0, 0, 0), 5)
    ref[0, 0, 0] = False
    pred = cube((8, 7, 7), (1, 0, 0), 5)
    h, a = hd95_and_assd(pred, ref, (3.0, 0.8, 0.8))
    bh, ba = brute_force_metrics(pred, ref, (3.0, 0.8, 0.8))
    assert h == pytest.approx(bh) and a == pytest.approx(ba)
    _, d_rp = surface_distances(pred, ref, (3.0, 0.8, 0.8))
    assert len(d_rp) == len(brute_force_surface(ref)) == 5 ** 3 - 3 ** 3 - 1


def test_identical_masks_give_zero():
    m = cube((8, 8, 8), (2, 1, 3), 4)
    assert hd95(m, m, (3.0, 0.8, 0.8)) == 0.0
    assert assd(m, m, (3.0, 0.8, 0.8)) == 0.0


@pytest.mark.parametrize("axis,k", [(0, 3), (1, 2), (2, 4)])
def test_single_voxels_at_distance_k_times_spacing(axis, k):
    spacing = (3.0, 0.8, 0.5)
    ref = np.zeros((6, 6, 6), bool)
    ref[1, 1, 1] = True
    pos = [1, 1, 1]
    pos[axis] += k
    pred = np.zeros_like(ref)
    pred[tuple(pos)] = True
    assert hd95(pred, ref, spacing) == pytest.approx(k * spacing[axis])
    assert assd(pred, ref, spacing) == pytest.approx(k * spacing[axis])


def test_diagonal_offset_uses_euclidean_mm_distance():
    ref, pred = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    ref[0, 0, 0] = pred[1, 1, 0] = True
    assert hd95(pred, ref, (3.0, 0.8, 0.5)) == pytest.approx(np.hypot(3.0, 0.8))


def test_hd95_is_the_95th_percentile_not_the_maximum():
    # A 20-voxel line and the same line plus one outlier 20 voxels further along x (0.5 mm):
    # pred->ref distances are 20 zeros and one 10.0 mm; ref->pred are 20 zeros. The 95th
    # percentile of 21 values (index 0.95*20 = 19) is the 20th smallest = 0, so HD95 = 0
    # while the plain Hausdorff distance would be 10 mm. ASSD = 10 / 41.
    ref = np.zeros((3, 3, 40), bool)
    ref[1, 1, :20] = True
    pred = ref.copy()
    pred[1, 1, 39] = True
    assert hd95(pred, ref, (1.0, 1.0, 0.5)) == 0.0
    assert assd(pred, ref, (1.0, 1.0, 0.5)) == pytest.approx(10.0 / 41)


def test_empty_masks():
    empty, m = np.zeros((4, 4, 4), bool), cube((4, 4, 4), (1, 1, 1), 2)
    assert hd95(empty, empty, (1, 1, 1)) == 0.0 and assd(empty, empty, (1, 1, 1)) == 0.0
    assert np.isnan(hd95(empty, m, (1, 1, 1))) and np.isnan(assd(empty, m, (1, 1, 1)))
    assert np.isnan(hd95(m, empty, (1, 1, 1))) and np.isnan(assd(m, empty, (1, 1, 1)))
    with pytest.raises(ValueError):
        surface_distances(m, empty, (1, 1, 1))


def test_singleton_axis_is_measured_in_plane():
    # A 2D case stored as one slice [1, Y, X]: 3x3 squares shifted by one voxel along x.
    # In-plane (4-neighbour) surfaces are the 8 border voxels of each square; the result must
    # equal the 2D brute force. Hand value: ref->pred is [sx]*3 (the column the prediction
    # left) + [sy] (the ref's right-middle voxel lies inside pred; nearest pred surface is
    # one row away) + four zeros, and symmetrically for pred->ref, so with sy=0.5, sx=1.0
    # ASSD = 2*(3*1.0 + 0.5)/16 = 0.4375.
    ref, pred = np.zeros((1, 5, 6), bool), np.zeros((1, 5, 6), bool)
    ref[0, 0:3, 0:3] = True
    pred[0, 0:3, 1:4] = True
    spacing = (999.0, 0.5, 1.0)
    assert assd(pred, ref, spacing) == pytest.approx(0.4375)
    bh, ba = brute_force_metrics(pred[0], ref[0], spacing[1:])
    assert hd95(pred, ref, spacing) == pytest.approx(bh)
    assert ba == pytest.approx(0.4375)


def test_bad_spacing_or_shapes_raise():
    m = cube((4, 4, 4), (1, 1, 1), 2)
    with pytest.raises(ValueError):
        hd95(m, m, (1.0, 1.0))
    with pytest.raises(ValueError):
        hd95(m, m[:3], (1.0, 1.0, 1.0))
