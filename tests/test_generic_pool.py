"""Generic planning of heterogeneous pools: the patch fits most volumes, the rest are listed as padded.

Volumes are synthetic CT blocks (all body, so the body crop keeps their shape). The two-volume pool
has the geometry of a 233x167x191 chest CTA at 1.5 mm and a 512x512x120 thin-slice series at
0.7 x 0.7 x 0.625 mm, scaled by 1/8 (voxels / 8, spacing x 8) to stay fast.
"""
import json
import os

import numpy as np
import pytest

from conftest import write_image
from nnssl.errors import NnsslError
from nnssl.planning.api import plan_and_preprocess
from nnssl.planning.generic import fitting_cap

POOL = "Dataset009_Mixed"
# (x, y, z) voxels and spacing in mm, SimpleITK order
TWO = {"cta": ((29, 21, 24), (12.0, 12.0, 12.0)), "thin": ((64, 64, 15), (5.6, 5.6, 5.0))}


@pytest.fixture(autouse=True)
def _few_intensity_samples(monkeypatch):
    """The fingerprint's intensity sample (10^8 voxels by default) does not shape the patch: keep it small."""
    from nnssl.planning import generic
    monkeypatch.setattr(generic, "TOTAL_INTENSITY_SAMPLES", 1e4)


def write_pool(raw_root, volumes):
    root = os.path.join(raw_root, POOL, "imagesTr")
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for name, (size, spacing) in volumes.items():
        write_image(os.path.join(root, f"{name}_0000.nii.gz"),
                    (40 + rng.normal(0, 10, size[::-1])).astype(np.int16), spacing)
    with open(os.path.join(root, "..", "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": len(volumes),
                   "file_ending": ".nii.gz", "nnssl_unlabeled": True}, f)


def plans_of(result):
    with open(result["plans"]["plainconvunet"], encoding="utf-8") as f:
        return json.load(f)


def test_fitting_cap_by_hand():
    # A is small along axis 0, B along axis 1: each alone would pass a per-axis 10 % percentile
    extents = np.array([[10, 50, 50], [50, 10, 50]] + [[40, 40, 40]] * 8, dtype=float)
    np.testing.assert_array_equal(fitting_cap(extents, 0.8), [40, 40, 40])  # 8 of 10 hold it
    np.testing.assert_array_equal(fitting_cap(extents, 0.85), [10, 10, 40])  # 40^3 fits only 80 %
    np.testing.assert_array_equal(fitting_cap(extents, 1.0), [10, 10, 40])
    with pytest.raises(NnsslError, match="--patch_fit_fraction 0"):
        fitting_cap(extents, 0)


@pytest.mark.parametrize("options", [{}, {"spacing": ["median"]}, {"ct_window": (-200.0, 300.0)}])
def test_two_volume_pool_cta_and_thin_slices_plans(nnunet_env, capsys, options):
    """Before: refused ("Every volume ... is smaller than the patch"), with either option too."""
    write_pool(nnunet_env["nnUNet_raw"], TWO)
    result = plan_and_preprocess(POOL, generic=True, no_pp=True, num_processes=1, show_progress=False, **options)
    plans = plans_of(result)
    cfg = plans["configurations"]["3d_fullres"]
    # median (= mean of two) spacing per axis (z, y, x): (12 + 5) / 2, (12 + 5.6) / 2, (12 + 5.6) / 2
    spacing_zyx = np.array([8.5, 8.8, 8.8])
    order = plans["transpose_forward"]
    np.testing.assert_allclose(cfg["spacing"], spacing_zyx[order], rtol=1e-6)
    # resampled extents (z, y, x): cta 24*12/8.5, 21*12/8.8, 29*12/8.8; thin 15*5/8.5, 64*5.6/8.8 (twice)
    cta = np.array([24 * 12 / 8.5, 21 * 12 / 8.8, 29 * 12 / 8.8])[order]
    thin = np.array([15 * 5 / 8.5, 64 * 5.6 / 8.8, 64 * 5.6 / 8.8])[order]
    patch = np.array(cfg["patch_size"])
    assert (patch <= np.minimum(cta, thin)).all() and (patch > np.minimum(cta, thin) / 2).all(), patch
    assert plans["nnssl_patch_fit_fraction"] == 0.9
    assert "smaller than the patch" not in capsys.readouterr().out  # both volumes hold it whole
    if "ct_window" in options:  # the window as nnU-Net's CTNormalization statistics
        props = plans["foreground_intensity_properties_per_channel"]["0"]
        assert (props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"]) == \
               (-200.0, 300.0, 50.0, 250.0)


def test_mixed_pool_holds_the_patch_in_90_percent_and_lists_the_rest(nnunet_env, capsys):
    """20 volumes at 1 mm (so extents are voxel counts): 18 regular, one thin slab, one narrow scan."""
    volumes = {f"reg{i:02d}": ((24 + i % 5, 24 + i % 3, 20 + i % 4), (1.0, 1.0, 1.0)) for i in range(18)}
    volumes["slab"] = ((30, 30, 6), (1.0, 1.0, 1.0))  # z 6 < every other z
    volumes["narrow"] = ((26, 12, 22), (1.0, 1.0, 1.0))  # y 12 < every other y
    write_pool(nnunet_env["nnUNet_raw"], volumes)
    plans = plans_of(plan_and_preprocess(POOL, generic=True, no_pp=True, num_processes=1, show_progress=False))
    cfg = plans["configurations"]["3d_fullres"]
    patch_zyx = np.array(cfg["patch_size"])[np.argsort(plans["transpose_forward"])]
    # 90 % of 20 = 18 volumes must hold it: the cap is the 2nd smallest extent per axis: z 20, y 24, x 24
    assert (patch_zyx <= [20, 24, 24]).all() and (patch_zyx > [10, 12, 12]).all(), patch_zyx
    extents = {n: np.array(size[::-1]) for n, (size, _) in volumes.items()}
    holding = sorted(n for n, e in extents.items() if (e >= patch_zyx).all())
    assert len(holding) >= 18 and "slab" not in holding and "narrow" not in holding
    out = capsys.readouterr().out
    assert f"nnssl: 2 of 20 volume(s) of {POOL} are smaller than the patch" in out
    assert "padded with zeros" in out and "narrow (" in out and "slab (" in out


def test_patch_fit_fraction_needs_generic_and_a_share(nnunet_env):
    write_pool(nnunet_env["nnUNet_raw"], TWO)
    with pytest.raises(NnsslError, match="add --generic"):
        plan_and_preprocess(POOL, patch_fit_fraction=0.5)
    with pytest.raises(NnsslError, match=r"--patch_fit_fraction 1.5: give a share of the volumes in \(0, 1\]"):
        plan_and_preprocess(POOL, generic=True, patch_fit_fraction=1.5, no_pp=True, show_progress=False)
