"""The synthetic BTCV-like phantom generator and its writer / CLI (SPEC §8)."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnssl.cli.synthetic import main
from nnssl.dataset_conversion.phantom import (DEFAULT_SHAPE, LABELS, ORGAN_HU, realize, render_anatomy,
                                              sample_params)
from nnssl.dataset_conversion.synthetic import make_phantom, volume_rng, write_synthetic_btcv

SMALL = (12, 32, 32)


def _phantom(seed, **kw):
    return make_phantom(np.random.default_rng(seed), **kw)


def _world_centroid(ph, label):
    """Physical (x, y, z) of the centroid of one label, through the phantom's header (LPS world)."""
    zyx = np.argwhere(ph.label == label).mean(axis=0)
    d = np.array(ph.direction).reshape(3, 3)
    return np.array(ph.origin) + d @ (np.array(ph.spacing) * zyx[::-1])


def test_same_seed_identical_different_seed_differs():
    a, b, c = _phantom(3), _phantom(3), _phantom(4)
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert (a.spacing, a.origin, a.direction) == (b.spacing, b.origin, b.direction)
    assert not np.array_equal(a.image, c.image) and not np.array_equal(a.label, c.label)
    assert a.spacing != c.spacing and a.origin != c.origin
    # Returning the label or not does not change the image.
    assert np.array_equal(_phantom(3, labeled=False).image, a.image) and _phantom(3, labeled=False).label is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_13_labels_at_default_size(seed):
    ph = _phantom(seed)
    assert ph.image.shape == ph.label.shape == DEFAULT_SHAPE
    assert ph.image.dtype == np.int16 and ph.label.dtype == np.uint8
    assert set(np.unique(ph.label)) == set(range(14))
    for small in (4, 5, 10, 12, 13):  # gallbladder, esophagus, portal vein, adrenals stay visible
        assert (ph.label == small).sum() >= 20, LABELS[small]


def test_label_voxels_carry_the_organ_hu_and_ranges():
    params = sample_params(np.random.default_rng(7))
    hu, label, body = render_anatomy(params)
    table = {s.label: s.hu for s in params.structures if s.label}
    assert set(table) == set(LABELS)
    for k, value in table.items():
        assert np.all(hu[label == k] == np.float32(value)), LABELS[k]
        assert abs(value - ORGAN_HU[k]) <= 28  # contrast-phase offset (+-25) + per-organ jitter (+-3)
    assert np.all(hu[~body] == -1000) and np.all(label[~body] == 0) and 0.2 < body.mean() < 0.9
    assert (hu > 400).sum() > 50  # vertebra and ribs
    ph = realize(params)
    if params.orientation == "identity":
        assert np.array_equal(ph.label, label)
    corners = ph.image[:, :4, :4]  # in-plane corners lie outside the elliptic body
    assert abs(corners.mean() + 1000) < 3 and corners.std() > 5  # air with noise
    assert (ph.image > 400).sum() > 50
    for k, value in table.items():
        assert abs(ph.image[ph.label == k].mean() - value) < 20, LABELS[k]  # bias + noise stay small
    # The near-identical soft organs are ordered as in the table, the contrast ones far above.
    assert table[11] < table[1] < table[6] < table[2] - 60


def test_spacing_ranges_directions_and_overrides():
    drawn = [sample_params(np.random.default_rng(s)) for s in range(20)]
    for p in drawn:
        sx, sy, sz = p.spacing
        assert sx == sy and 0.6 <= sx <= 1.0 and 2.5 <= sz <= 5.0
        d = np.array(p.direction).reshape(3, 3)
        assert np.allclose(d @ d.T, np.eye(3))
    kinds = {p.orientation for p in drawn}
    assert "identity" in kinds and len(kinds) >= 3
    assert sum(p.direction != tuple(np.eye(3).ravel()) for p in drawn) >= 3
    assert _phantom(0, shape=SMALL, spacing=(1.0, 1.0, 2.0)).spacing == (1.0, 1.0, 2.0)


def test_anatomy_sides_hold_in_world_space_for_every_orientation():
    """Patient's right is world -x (LPS) whatever the direction matrix (arrays are flipped to match)."""
    seen = set()
    for seed in range(12):
        params = sample_params(np.random.default_rng(seed))
        seen.add(params.orientation)
        ph = realize(params)
        liver, spleen, rkid, lkid = (_world_centroid(ph, k) for k in (6, 1, 2, 3))
        assert liver[0] < spleen[0] and rkid[0] < lkid[0]  # right of the patient at smaller x
        assert _world_centroid(ph, 7)[1] < _world_centroid(ph, 8)[1]  # stomach anterior of the aorta
        assert liver[2] > rkid[2]  # liver above the right kidney
    assert {"identity", "flip_xy", "flip_z"} <= seen


def test_fov_scale_shrinks_body_and_scales_spacing():
    near, wide = _phantom(5, shape=SMALL), _phantom(5, shape=SMALL, fov_scale=2.0)
    assert np.allclose(wide.spacing, 2 * np.array(near.spacing))
    ratio = (wide.image > -500).mean() / (near.image > -500).mean()
    assert 0.1 < ratio < 0.4  # the body covers ~1/4 of the in-plane field at twice the field of view


def test_write_layout_roundtrip_and_volume_independence(tmp_path):
    out = write_synthetic_btcv(str(tmp_path / "syn"), cases=2, test_cases=1, unlabeled=2, seed=1, shape=SMALL)
    root = tmp_path / "syn"
    assert out == {"raw_data": str(root / "RawData"), "unlabeled": str(root / "Unlabeled"),
                   "testing_labels": str(root / "TestingLabels")}
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["RawData/Testing/img/img0003.nii.gz", "RawData/Training/img/img0001.nii.gz",
                     "RawData/Training/img/img0002.nii.gz", "RawData/Training/label/label0001.nii.gz",
                     "RawData/Training/label/label0002.nii.gz", "TestingLabels/label0003.nii.gz",
                     "Unlabeled/unlabeled_0001.nii.gz", "Unlabeled/unlabeled_0002.nii.gz", "nnssl_synthetic.json"]
    ref = make_phantom(volume_rng(1, "training", 2), SMALL)
    img = sitk.ReadImage(str(root / "RawData/Training/img/img0002.nii.gz"))
    lab = sitk.ReadImage(str(root / "RawData/Training/label/label0002.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(img), ref.image)
    assert np.array_equal(sitk.GetArrayFromImage(lab), ref.label) and sitk.GetArrayFromImage(lab).dtype == np.uint8
    for im in (img, lab):
        assert np.allclose(im.GetSpacing(), ref.spacing, atol=1e-5)
        assert np.allclose(im.GetOrigin(), ref.origin, atol=1e-3)
        assert np.allclose(im.GetDirection(), ref.direction, atol=1e-6)
    unl = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "Unlabeled/unlabeled_0001.nii.gz")))
    assert np.array_equal(unl, make_phantom(volume_rng(1, "unlabeled", 1), SMALL, labeled=False).image)
    test_img = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "RawData/Testing/img/img0003.nii.gz")))
    assert np.array_equal(test_img, make_phantom(volume_rng(1, "testing", 1), SMALL).image)
    # A volume depends on (seed, kind, index) only: more cases elsewhere leave img0001 unchanged.
    write_synthetic_btcv(str(tmp_path / "more"), cases=3, test_cases=0, unlabeled=0, seed=1, shape=SMALL)
    first = [sitk.GetArrayFromImage(sitk.ReadImage(str(d / "RawData/Training/img/img0001.nii.gz")))
             for d in (root, tmp_path / "more")]
    assert np.array_equal(*first)
    assert not np.array_equal(test_img, first[0]) and not np.array_equal(unl, first[0])


def test_cli_writes_layout_and_resumes(tmp_path):
    out = tmp_path / "syn"
    argv = ["-o", str(out), "--cases", "2", "--test_cases", "1", "--unlabeled", "1", "--seed", "4",
            "--shape", *map(str, SMALL), "--unlabeled_fov_scale", "1.5"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    settings = json.loads((out / "nnssl_synthetic.json").read_text(encoding="utf-8"))
    assert settings["shape"] == list(SMALL) and settings["unlabeled_fov_scale"] == 1.5
    files = sorted(p for p in out.rglob("*.nii.gz"))
    assert len(files) == 7 and not list(out.rglob(".tmp-*"))
    unl = sitk.ReadImage(str(out / "Unlabeled/unlabeled_0001.nii.gz"))
    tr = sitk.ReadImage(str(out / "RawData/Training/img/img0001.nii.gz"))
    assert unl.GetSpacing()[0] > 0.6 * 1.5 - 1e-6 and tr.GetSpacing()[0] <= 1.0 + 1e-6
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    victim = out / "RawData/Training/label/label0002.nii.gz"
    content = sitk.GetArrayFromImage(sitk.ReadImage(str(victim)))
    victim.unlink()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(victim))), content)
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items() if p != victim)


@pytest.mark.parametrize("flags", [["--cases", "0"], ["--unlabeled", "-1"], ["--test_cases", "-2"],
                                   ["--shape", "0", "8", "8"], ["--shape", "8", "8"], ["--seed", "-1"],
                                   ["--unlabeled_fov_scale", "0"], ["--cases", "two"]])
def test_cli_bad_flags_exit_2(tmp_path, flags):
    with pytest.raises(SystemExit) as e:
        main(["-o", str(tmp_path / "syn"), "--shape", *map(str, SMALL), *flags])
    assert e.value.code == 2
    assert not (tmp_path / "syn" / "RawData").exists()


def test_cli_refuses_other_settings_and_foreign_folders(tmp_path, capsys):
    out = tmp_path / "syn"
    write_synthetic_btcv(str(out), cases=1, test_cases=0, unlabeled=0, seed=0, shape=SMALL)
    with pytest.raises(SystemExit) as e:
        main(["-o", str(out), "--cases", "1", "--test_cases", "0", "--unlabeled", "0", "--seed", "9",
              "--shape", *map(str, SMALL)])
    assert e.value.code == 2 and "seed: 0 -> 9" in capsys.readouterr().err
    foreign = tmp_path / "btcv" / "RawData" / "Training" / "img"
    foreign.mkdir(parents=True)
    (foreign / "img0001.nii.gz").write_bytes(b"real data")
    with pytest.raises(SystemExit) as e:
        main(["-o", str(tmp_path / "btcv"), "--shape", *map(str, SMALL)])
    assert e.value.code == 2 and (foreign / "img0001.nii.gz").read_bytes() == b"real data"
