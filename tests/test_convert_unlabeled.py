"""nnssl_convert_unlabeled: mixed volume formats and DICOM series -> unlabeled nnU-Net raw dataset."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import snapshot, write_image

from nnssl.cli.convert_unlabeled import main
from nnssl.dataset_conversion.unlabeled import convert_unlabeled
from nnssl.dataset_conversion.validation import validate_raw_dataset
from nnssl.errors import NnsslError

UID_ROOT = "1.2.826.0.1.3680043.2.1125.77"


def write_dicom_series(folder, arr, spacing, origin, series_uid, prefix):
    """arr: [Z, Y, X] int16, one CT slice file per z with the tags GDCM sorts and stacks by."""
    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        pos = (origin[0], origin[1], origin[2] + k * spacing[2])
        sl = sitk.GetImageFromArray(arr[k:k + 1])
        sl.SetSpacing(spacing)
        sl.SetOrigin(pos)
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": UID_ROOT + ".1", "0020|000e": series_uid, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.4f}" for p in pos), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}", "0018|0050": f"{spacing[2]:.4f}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{prefix}{k:03d}.dcm"))
        writer.Execute(sl)


def make_mixed_folder(root, rng):
    """Five files in five formats plus one folder with two DICOM series; returns {source key: (array, geometry)}."""
    spec = {"a.nii": (5, 8, 9), "c.nrrd": (4, 7, 6), "d.mha": (6, 5, 7), "e.mhd": (3, 6, 8), "sub/b.nii.gz": (5, 6, 7)}
    truth = {}
    for i, (name, shape) in enumerate(spec.items()):
        arr = rng.integers(-1000, 2000, shape).astype(np.int16)
        geom = dict(spacing=(0.6 + 0.1 * i, 0.75, 2.5 + i), origin=(-50.25 + i, 10.5, 3.0 * i),
                    direction=(0, 1, 0, -1, 0, 0, 0, 0, 1) if name == "d.mha" else None)
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        write_image(os.path.join(root, name), arr, **geom)
        truth[name] = (arr, geom)
    for j, shape in enumerate([(4, 6, 5), (3, 5, 6)]):
        arr = rng.integers(-1000, 2000, shape).astype(np.int16)
        geom = dict(spacing=(0.5 + j, 0.7, 2.0 + j), origin=(-10.0 * j, 5.5, 1.25), direction=None)
        uid = f"{UID_ROOT}.{2 + j}"
        write_dicom_series(os.path.join(root, "dicom"), arr, geom["spacing"], geom["origin"], uid, f"s{j}_")
        truth[f"dicom#{uid}"] = (arr, geom)
    with open(os.path.join(root, "notes.txt"), "w", encoding="utf-8") as f:
        f.write("not an image")
    return truth


@pytest.fixture
def mixed(tmp_path):
    root = str(tmp_path / "volumes")
    return root, make_mixed_folder(root, np.random.default_rng(1))


def test_mixed_formats_round_trip(nnunet_env, mixed):
    src, truth = mixed
    out = convert_unlabeled(src, dataset_id=3, name="Pool", progress=False)
    assert out == os.path.join(nnunet_env["nnUNet_raw"], "Dataset003_Pool")
    with open(os.path.join(out, "conversion_log.json"), encoding="utf-8") as f:
        log = json.load(f)
    keys = [os.path.relpath(c["source"], src) + (f"#{c['series_uid']}" if "series_uid" in c else "")
            for c in log["cases"]]
    # sorted source paths; the two series of one folder sorted by UID
    assert keys == ["a.nii", "c.nrrd", "d.mha", f"dicom#{UID_ROOT}.2", f"dicom#{UID_ROOT}.3", "e.mhd", "sub/b.nii.gz"]
    assert [c["output"] for c in log["cases"]] == [f"imagesTr/Pool_{i:04d}_0000.nii.gz" for i in range(1, 8)]
    assert sorted(os.listdir(os.path.join(out, "imagesTr"))) == [f"Pool_{i:04d}_0000.nii.gz" for i in range(1, 8)]
    assert log["ignored"] == [os.path.join(src, "notes.txt")]  # e.raw belongs to e.mhd
    for key, case in zip(keys, log["cases"]):
        arr, geom = truth[key]
        img = sitk.ReadImage(os.path.join(out, case["output"]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)
        np.testing.assert_allclose(img.GetSpacing(), geom["spacing"], atol=1e-4)
        np.testing.assert_allclose(img.GetOrigin(), geom["origin"], atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), geom["direction"] or np.eye(3).ravel(), atol=1e-6)
    assert log["cases"][3]["slices"] == 4 and log["skipped"] == []
    validate_raw_dataset(out, full=True, progress=False)


def test_dataset_json_and_channel_name(nnunet_env, mixed, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-i", mixed[0], "--name", "MRPool", "--channel_name", "T1"])
    assert e.value.code == 0
    with open(os.path.join(nnunet_env["nnUNet_raw"], "Dataset001_MRPool", "dataset.json"), encoding="utf-8") as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "T1"} and dj["labels"] == {"background": 0}
    assert dj["numTraining"] == 7 and dj["file_ending"] == ".nii.gz" and dj["nnssl_unlabeled"] is True


def _truncated_gz(src):
    p = os.path.join(src, "sub", "b.nii.gz")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return p


def _nan_mha(src):
    p = os.path.join(src, "d.mha")
    arr = np.zeros((4, 5, 6), np.float32)
    arr[2, 2, 2] = np.nan
    write_image(p, arr)
    return p


def _two_d_nrrd(src):
    p = os.path.join(src, "c.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((7, 6), np.int16)), p)
    return p


def _four_d(src):
    p = os.path.join(src, "zz.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), p)
    return p


def _no_series(src):
    folder = os.path.join(src, "broken_dicom")
    os.makedirs(folder)
    with open(os.path.join(folder, "x.dcm"), "wb") as f:
        f.write(b"\0" * 200)
    return folder


@pytest.mark.parametrize("corrupt", [_truncated_gz, _nan_mha, _two_d_nrrd, _four_d, _no_series])
def test_bad_input_fails_cleanly(nnunet_env, mixed, corrupt, capsys):
    src = mixed[0]
    bad = corrupt(src)
    before = snapshot(src)
    with pytest.raises(SystemExit) as e:
        main(["-i", src, "-d", "4", "--name", "Pool"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nnssl error" in err and bad in err and "Traceback" not in err
    assert snapshot(src) == before
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []


def test_empty_folder(nnunet_env, tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no volumes here", encoding="utf-8")
    with pytest.raises(NnsslError, match=r"Found no volumes in '.*empty' .*1 other file\(s\) ignored"):
        convert_unlabeled(str(tmp_path / "empty"), dataset_id=1, name="X", progress=False)
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []


def test_skip_bad_lists_skipped(nnunet_env, mixed):
    src = mixed[0]
    bad_file, bad_dir = _truncated_gz(src), _no_series(src)
    out = convert_unlabeled(src, dataset_id=5, name="Pool", skip_bad=True, progress=False)
    with open(os.path.join(out, "conversion_log.json"), encoding="utf-8") as f:
        log = json.load(f)
    assert sorted(s["source"] for s in log["skipped"]) == sorted([bad_file, bad_dir])
    assert all(s["source"] in s["error"] for s in log["skipped"])
    assert [c["output"] for c in log["cases"]] == [f"imagesTr/Pool_{i:04d}_0000.nii.gz" for i in range(1, 7)]
    assert bad_file not in [c["source"] for c in log["cases"]]
    with open(os.path.join(out, "dataset.json"), encoding="utf-8") as f:
        assert json.load(f)["numTraining"] == 6


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(f in out for f in ("-i", "-d", "--name", "--channel_name", "--skip_bad", "--overwrite"))


def _series_with_bad_slice(src, how):
    """A 6-slice series 3.44 mm apart in src/ct (int16 [Z, Y, X] = [6, 8, 9]), one slice then dropped or cut."""
    folder = os.path.join(src, "ct")
    arr = np.random.default_rng(3).integers(-1000, 1000, (6, 8, 9)).astype(np.int16)
    write_dicom_series(folder, arr, (0.7, 0.7, 3.44), (0.0, 0.0, 0.0), f"{UID_ROOT}.9", "s")
    victim = os.path.join(folder, "s002.dcm" if how != "cut_last" else "s005.dcm")
    if how == "dropped":
        os.remove(victim)
    else:  # an interrupted copy: GDCM leaves the cut file out of the series
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) - 50])
    return folder


@pytest.mark.parametrize("how, message", [
    # ITK would stack the 5 remaining slices 4.3 mm apart (17.2 mm / 4) instead of 3.44 mm
    ("dropped", r"slices s001.dcm and s003.dcm are 6.88 mm apart, while the other slices are 3.44 mm apart"),
    ("cut", r"s002.dcm in '.*ct' belong to no readable series"),
    ("cut_last", r"s005.dcm in '.*ct' belong to no readable series"),  # no gap in the positions
])
def test_dicom_series_with_missing_or_truncated_slice(nnunet_env, tmp_path, capsys, how, message):
    src = str(tmp_path / "volumes")
    os.makedirs(src)
    write_image(os.path.join(src, "ok.nii.gz"), np.zeros((4, 5, 6), np.int16))
    folder = _series_with_bad_slice(src, how)
    with pytest.raises(SystemExit) as e:
        main(["-i", src, "-d", "6", "--name", "Pool"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err) and "--skip_bad" in err, err
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []
    out = convert_unlabeled(src, dataset_id=6, name="Pool", skip_bad=True, progress=False)
    with open(os.path.join(out, "conversion_log.json"), encoding="utf-8") as f:
        log = json.load(f)
    assert [c["source"] for c in log["cases"]] == [os.path.join(src, "ok.nii.gz")]
    assert [s["source"] for s in log["skipped"]] == [folder]
    assert __import__("re").search(message, log["skipped"][0]["error"])


def test_slice_positions_tolerate_rounding_but_not_duplicates():
    from nnssl.dataset_conversion.dicom import check_slice_positions

    names = [f"s{i}" for i in range(5)]
    check_slice_positions([0.0, 3.44, 6.88, 10.33, 13.76], names, "series")  # 0.01 mm rounding
    check_slice_positions([13.76, 10.32, 6.88, 3.44, 0.0], names, "series")  # descending order
    with pytest.raises(NnsslError, match="series: slices s1 and s2 lie at the same position"):
        check_slice_positions([0.0, 3.44, 3.44, 6.88, 10.32], names, "series")
    with pytest.raises(NnsslError, match="slices s2 and s3 are 4 mm apart.*3 mm apart.*unevenly spaced"):
        check_slice_positions([0.0, 3.0, 6.0, 10.0, 13.0], names, "series")
