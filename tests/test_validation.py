"""Raw-data validation: every bad input raises NnsslError naming the file."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_image

from nnssl.dataset_conversion import validation as V
from nnssl.dataset_conversion.dicom import dicom_series
from nnssl.errors import NnsslError


def _case(root, case="case_001"):
    return os.path.join(root, "imagesTr", f"{case}_0000.nii.gz"), os.path.join(root, "labelsTr", f"{case}.nii.gz")


def _edit_json(root, **changes):
    p = os.path.join(root, "dataset.json")
    with open(p, encoding="utf-8") as f:
        dj = json.load(f)
    for k, v in changes.items():
        if v is None:
            dj.pop(k)
        else:
            dj[k] = v
    with open(p, "w", encoding="utf-8") as f:
        json.dump(dj, f)


def test_valid_dataset_passes_and_lists_cases(blob_dataset):
    out = V.validate_raw_dataset(blob_dataset, full=True, progress=False)
    assert out == {"cases": [f"case_{i:03d}" for i in range(4)], "test_cases": ["case_004"], "unlabeled": False}


def test_missing_and_malformed_dataset_json(blob_dataset):
    p = os.path.join(blob_dataset, "dataset.json")
    with open(p, "w", encoding="utf-8") as f:
        f.write('{"channel_names": {"0": "CT"},')
    with pytest.raises(NnsslError, match="not valid JSON"):
        V.validate_raw_dataset(blob_dataset, full=False)
    os.remove(p)
    with pytest.raises(NnsslError, match="No dataset.json"):
        V.validate_raw_dataset(blob_dataset, full=False)


@pytest.mark.parametrize("key", V.DATASET_JSON_KEYS)
def test_missing_dataset_json_key(blob_dataset, key):
    _edit_json(blob_dataset, **{key: None})
    with pytest.raises(NnsslError, match=f"lacks the key\\(s\\) {key}"):
        V.validate_raw_dataset(blob_dataset, full=False)


def test_num_training_mismatch(blob_dataset):
    _edit_json(blob_dataset, numTraining=7)
    with pytest.raises(NnsslError, match="numTraining is 7 but .* holds 4 cases"):
        V.validate_raw_dataset(blob_dataset, full=False)


@pytest.mark.parametrize("what,change,shown", [
    ("shape", dict(arr_shape=(24, 40, 39)), "(39, 40, 24)"),
    ("spacing", dict(spacing=(0.5, 0.5, 2.0)), "(0.5, 0.5, 2)"),
    ("origin", dict(origin=(3.0, 0.0, 0.0)), "(3, 0, 0)"),
    ("direction", dict(direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)), "(0, 1, 0, 1, 0, 0, 0, 0, 1)"),
])
def test_geometry_mismatch_names_both_values(blob_dataset, what, change, shown):
    img_path, lab_path = _case(blob_dataset)
    img = sitk.ReadImage(img_path)
    geom = dict(spacing=img.GetSpacing(), origin=img.GetOrigin(), direction=img.GetDirection())
    geom.update({k: v for k, v in change.items() if k != "arr_shape"})
    write_image(lab_path, np.zeros(change.get("arr_shape", (24, 40, 40)), np.uint8), **geom)
    with pytest.raises(NnsslError) as e:
        V.validate_raw_dataset(blob_dataset, full=False)
    msg = str(e.value)
    assert f"{what} {shown}" in msg and lab_path in msg and img_path in msg


def test_geometry_within_tolerance_passes(blob_dataset):
    """At origin 0 the tolerance is GEOMETRY_ATOL = 1e-6 mm: a label header 5e-7 mm off passes (float32 round-off
    in NIfTI headers is not a mismatch), 5e-6 mm off is refused."""
    img_path, lab_path = _case(blob_dataset)
    img, lab = sitk.ReadImage(img_path), sitk.ReadImage(lab_path)
    assert img.GetOrigin() == (0.0, 0.0, 0.0)
    for offset in (5e-7, 5e-6):
        lab.SetOrigin((offset, offset, offset))
        sitk.WriteImage(lab, lab_path)
        written = sitk.ReadImage(lab_path).GetOrigin()
        assert written != img.GetOrigin() and all(abs(abs(w) - offset) < 1e-3 * offset for w in written)
        if offset < V.GEOMETRY_ATOL:
            out = V.validate_raw_dataset(blob_dataset, full=False, progress=False)
            assert out["cases"] == [f"case_{i:03d}" for i in range(4)]  # the case is accepted, not dropped
        else:
            with pytest.raises(NnsslError, match=r"case_001.nii.gz' has origin .* but '.*case_001_0000.nii.gz' has "
                                                  r"origin \(0, 0, 0\)"):
                V.validate_raw_dataset(blob_dataset, full=False, progress=False)


def test_label_values_checked_only_when_full(blob_dataset):
    img_path, lab_path = _case(blob_dataset)
    lab = sitk.ReadImage(lab_path)
    arr = sitk.GetArrayFromImage(lab)
    arr[0, 0, :2] = [7, 9]
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(lab)
    sitk.WriteImage(bad, lab_path)
    V.validate_raw_dataset(blob_dataset, full=False, progress=False)  # header-only: voxels not read
    with pytest.raises(NnsslError, match=r"case_001.nii.gz' contains label values 7, 9 .*allowed: \[0, 1, 2\]"):
        V.validate_raw_dataset(blob_dataset, full=True, progress=False)


@pytest.mark.parametrize("bad_value,counts", [(np.nan, "1 NaN and 0 infinite"), (np.inf, "0 NaN and 1 infinite")])
def test_non_finite_voxels(blob_dataset, bad_value, counts):
    img_path, _ = _case(blob_dataset)
    img = sitk.ReadImage(img_path)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[3, 4, 5] = bad_value
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, img_path)
    with pytest.raises(NnsslError, match=f"case_001_0000.nii.gz' contains {counts} voxels"):
        V.validate_raw_dataset(blob_dataset, full=True, progress=False)


def test_2d_and_4d_images_rejected(tmp_path):
    p2, p4, p1 = str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), str(tmp_path / "c.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), p2)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.int16), isVector=False), p4)
    write_image(p1, np.zeros((1, 5, 6), np.int16))
    with pytest.raises(NnsslError, match="a.nii.gz' is not a 3D volume"):
        V.check_3d(V.read_header(p2))
    with pytest.raises(NnsslError, match="b.nii.gz' is a 4D image"):
        V.check_3d(V.read_header(p4))
    with pytest.raises(NnsslError, match="c.nii.gz' is not a 3D volume"):  # a single slice
        V.check_3d(V.read_header(p1))


def _cut(path, keep):
    """Keep the first ``keep`` bytes of ``path`` (an interrupted copy)."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep])
    return len(data)


def test_truncated_and_corrupt_files(tmp_path):
    arr = np.random.default_rng(0).integers(-1000, 1000, (10, 20, 30)).astype(np.int16)
    gz, nii = str(tmp_path / "x.nii.gz"), str(tmp_path / "y.nii")
    write_image(gz, arr)
    write_image(nii, arr)
    for p in (gz, nii):
        _cut(p, int(os.path.getsize(p) * 0.6))
    # 352-byte NIfTI-1 header + 6000 int16 voxels; the cut file's gzip trailer cannot say 12352
    with pytest.raises(NnsslError, match="x.nii.gz' is a truncated or corrupt gzip"):
        V.read_header(gz)  # header read only: the gzip trailer gives it away
    with pytest.raises(NnsslError, match="x.nii.gz' is a truncated or corrupt gzip"):
        V.read_image(gz)
    with pytest.raises(NnsslError, match="y.nii' is truncated: its header needs 12352 bytes"):
        V.read_header(nii)  # uncompressed: the file size gives it away without reading voxels
    junk = tmp_path / "z.nii.gz"
    junk.write_bytes(b"not an image" * 10)
    with pytest.raises(NnsslError, match="Cannot read the image header of '.*z.nii.gz'"):
        V.read_header(str(junk))


def test_gzip_trailer_of_complete_file_matches_header(tmp_path):
    gz = str(tmp_path / "x.nii.gz")
    write_image(gz, np.zeros((10, 20, 30), np.int16))
    assert V._gzip_isize(gz) == 352 + 10 * 20 * 30 * 2


def test_multi_member_gzip_is_judged_by_its_real_length(tmp_path):
    """A gzip file of two members (pigz/bgzip style): the trailer holds the last member's size only,
    so the cheap check falls back to decompressing, and a complete file passes."""
    import gzip
    gz = str(tmp_path / "x.nii.gz")
    arr = np.arange(10 * 20 * 30, dtype=np.int16).reshape(10, 20, 30)
    write_image(gz, arr)
    raw = gzip.open(gz).read()
    with open(gz, "wb") as f:
        f.write(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    assert V._gzip_isize(gz) == len(raw) - 5000
    V.read_header(gz)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(V.read_image(gz)), arr)


def test_truncated_gz_in_dataset_caught_always(blob_dataset):
    """Even the header-only check (no --verify_dataset_integrity) refuses a cut-off .nii.gz."""
    img_path, _ = _case(blob_dataset, "case_002")
    _cut(img_path, os.path.getsize(img_path) // 2)
    for full in (False, True):
        with pytest.raises(NnsslError, match="case_002_0000.nii.gz' is a truncated"):
            V.validate_raw_dataset(blob_dataset, full=full, progress=False)


def test_plan_and_preprocess_refuses_truncated_gz_without_verify_flag(blob_dataset, capsys):
    """Before: SimpleITK zero-filled the cut-off volume and planning exited 0."""
    from nnssl.cli.plan_and_preprocess import main

    img_path, _ = _case(blob_dataset, "case_003")
    _cut(img_path, os.path.getsize(img_path) * 3 // 4)
    with pytest.raises(SystemExit) as e:
        main(["-d", "1", "--no_pp", "-np", "1", "--no_pbar"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"'{img_path}' is a truncated or corrupt gzip" in err and "Copy or download it again" in err


def test_empty_images_folder(blob_dataset):
    for f in os.listdir(os.path.join(blob_dataset, "imagesTr")):
        os.remove(os.path.join(blob_dataset, "imagesTr", f))
    with pytest.raises(NnsslError, match="imagesTr' holds no images ending in .nii.gz"):
        V.validate_raw_dataset(blob_dataset, full=False)


def test_missing_and_extra_channel_files(blob_dataset):
    _edit_json(blob_dataset, channel_names={"0": "CT", "1": "CT2"})
    img_path, _ = _case(blob_dataset, "case_000")
    for c in ("case_000", "case_001", "case_003"):
        p, _ = _case(blob_dataset, c)
        os.link(p, p.replace("_0000.", "_0001."))
    with pytest.raises(NnsslError, match="Case 'case_002' .* lacks channel file\\(s\\) case_002_0001.nii.gz"):
        V.validate_raw_dataset(blob_dataset, full=False)
    _edit_json(blob_dataset, channel_names={"0": "CT"})
    with pytest.raises(NnsslError, match="case_000_0001.nii.gz' has channel index 1"):
        V.validate_raw_dataset(blob_dataset, full=False)


def test_missing_label_and_orphan_label(blob_dataset):
    _, lab = _case(blob_dataset, "case_003")
    os.rename(lab, lab.replace("case_003", "case_009"))
    with pytest.raises(NnsslError, match="'case_003' has no label file"):
        V.validate_raw_dataset(blob_dataset, full=False)
    os.link(_case(blob_dataset, "case_000")[1], lab)
    with pytest.raises(NnsslError, match="case_009.nii.gz' has no image in imagesTr"):
        V.validate_raw_dataset(blob_dataset, full=False)


def test_unlabeled_dataset_needs_no_labels(blob_dataset):
    import shutil
    shutil.rmtree(os.path.join(blob_dataset, "labelsTr"))
    with pytest.raises(NnsslError, match="labelsTr folder"):
        V.validate_raw_dataset(blob_dataset, full=False)
    _edit_json(blob_dataset, nnssl_unlabeled=True, labels={"background": 0})
    out = V.validate_raw_dataset(blob_dataset, full=True, progress=False)
    assert out["unlabeled"] and len(out["cases"]) == 4


def test_region_label_values():
    assert V.allowed_label_values({"background": 0, "whole": [1, 2], "core": 2}) == {0, 1, 2}
    with pytest.raises(NnsslError, match="label 'liver' has value '1'"):
        V.allowed_label_values({"background": 0, "liver": "1"})


def test_dicom_folder_without_series(tmp_path):
    (tmp_path / "slice1.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(NnsslError, match=f"Folder '{tmp_path}' holds DICOM-like files but no readable DICOM series"):
        dicom_series(str(tmp_path))
