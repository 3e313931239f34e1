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
