"""nnssl_convert_msd: Medical Segmentation Decathlon task -> nnU-Net raw dataset via nnU-Net's converter."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import snapshot, write_image

from nnssl.cli.convert_msd import main
from nnssl.dataset_conversion.msd import convert_msd
from nnssl.dataset_conversion.validation import validate_raw_dataset
from nnssl.errors import NnsslError

SHAPE = (5, 6, 7)  # [Z, Y, X]
SPACING, ORIGIN = (0.625, 0.7, 3.6), (-12.5, 30.25, 4.0)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def write_4d(path, arr):
    """arr: [C, Z, Y, X]; MSD stores modalities as the 4th image axis."""
    img = sitk.GetImageFromArray(arr, isVector=False)
    img.SetSpacing(SPACING + (1.0,))
    img.SetOrigin(ORIGIN + (0.0,))
    d = np.eye(4)
    d[:3, :3] = np.reshape(DIRECTION, (3, 3))
    img.SetDirection(tuple(d.ravel()))
    sitk.WriteImage(img, path)


def make_task(root, name, modalities, rng, train=("case_001", "case_002"), test=("case_010",)):
    """An MSD task folder in the old format; returns {case: image array ([Z,Y,X] or [C,Z,Y,X])}."""
    task = os.path.join(root, name)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(task, sub))
    arrays = {}
    for case in train + test:
        shape = SHAPE if len(modalities) == 1 else (len(modalities),) + SHAPE
        arr = rng.normal(0, 100, shape).astype(np.float32)
        folder = "imagesTr" if case in train else "imagesTs"
        if len(modalities) == 1:
            write_image(os.path.join(task, folder, case + ".nii.gz"), arr, SPACING, ORIGIN, DIRECTION)
        else:
            write_4d(os.path.join(task, folder, case + ".nii.gz"), arr)
        if case in train:
            write_image(os.path.join(task, "labelsTr", case + ".nii.gz"), rng.integers(0, 3, SHAPE).astype(np.uint8),
                        SPACING, ORIGIN, DIRECTION)
        arrays[case] = arr
    with open(os.path.join(task, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"name": name, "modality": {str(i): m for i, m in enumerate(modalities)},
                   "labels": {"0": "background", "1": "edema", "2": "tumour"}, "numTraining": len(train),
                   "numTest": len(test),
                   "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
                   "test": [f"./imagesTs/{c}.nii.gz" for c in test]}, f)
    return task, arrays


def test_single_and_multi_modal_tasks(nnunet_env, tmp_path):
    rng = np.random.default_rng(0)
    single, arr1 = make_task(str(tmp_path), "Task07_Single", ["CT"], rng)
    multi, arr2 = make_task(str(tmp_path), "Task08_Multi", ["T2", "ADC"], rng)

    out = convert_msd(single, progress=False)
    assert os.path.basename(out) == "Dataset007_Single"  # default ID: the task number
    assert sorted(os.listdir(os.path.join(out, "imagesTr"))) == ["case_001_0000.nii.gz", "case_002_0000.nii.gz"]
    img = sitk.ReadImage(os.path.join(out, "imagesTr", "case_002_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr1["case_002"])
    assert img.GetDirection() == DIRECTION
    with open(os.path.join(out, "dataset.json"), encoding="utf-8") as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {"background": 0, "edema": 1, "tumour": 2}
    assert dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz" and single in dj["nnssl_source"]
    assert "training" not in dj and "modality" not in dj

    out = convert_msd(multi, dataset_id=21, progress=False)
    assert os.path.basename(out) == "Dataset021_Multi"
    for case, folder in (("case_001", "imagesTr"), ("case_010", "imagesTs")):
        for c in range(2):
            img = sitk.ReadImage(os.path.join(out, folder, f"{case}_{c:04d}.nii.gz"))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr2[case][c])
            np.testing.assert_allclose(img.GetSpacing(), SPACING, rtol=1e-6)
            np.testing.assert_allclose(img.GetOrigin(), ORIGIN, rtol=1e-6)
            np.testing.assert_allclose(img.GetDirection(), DIRECTION, atol=1e-6)
    validate_raw_dataset(out, full=True, progress=False)
    assert sorted(os.listdir(nnunet_env["nnUNet_raw"])) == ["Dataset007_Single", "Dataset021_Multi"]


def _no_json(task):
    os.remove(os.path.join(task, "dataset.json"))
    return task


def _no_images_ts(task):
    for f in os.listdir(os.path.join(task, "imagesTs")):
        os.remove(os.path.join(task, "imagesTs", f))
    os.rmdir(os.path.join(task, "imagesTs"))
    return os.path.join(task, "imagesTs")


def _missing_label(task):
    os.remove(os.path.join(task, "labelsTr", "case_002.nii.gz"))
    return os.path.join(task, "imagesTr", "case_002.nii.gz")


def _wrong_modalities(task):
    p = os.path.join(task, "imagesTr", "case_001.nii.gz")
    write_4d(p, np.zeros((3,) + SHAPE, np.float32))
    return p


def _label_not_listed(task):
    p = os.path.join(task, "labelsTr", "case_001.nii.gz")
    write_image(p, np.full(SHAPE, 5, np.uint8), SPACING, ORIGIN, DIRECTION)
    return p


def _bad_json_keys(task):
    p = os.path.join(task, "dataset.json")
    with open(p, encoding="utf-8") as f:
        dj = json.load(f)
    del dj["modality"]
    with open(p, "w", encoding="utf-8") as f:
        json.dump(dj, f)
    return p


@pytest.mark.parametrize("corrupt", [_no_json, _no_images_ts, _missing_label, _wrong_modalities, _label_not_listed,
                                     _bad_json_keys])
def test_bad_task_fails_cleanly(nnunet_env, tmp_path, corrupt, capsys):
    task, _ = make_task(str(tmp_path), "Task09_Bad", ["T2", "ADC"], np.random.default_rng(1))
    bad = corrupt(task)
    before = snapshot(task)
    with pytest.raises(SystemExit) as e:
        main(["-i", task])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nnssl error" in err and bad in err and "Traceback" not in err
    assert snapshot(task) == before
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []


def test_folder_name_and_id_clash(nnunet_env, tmp_path):
    task, _ = make_task(str(tmp_path), "Task09_Bad", ["CT"], np.random.default_rng(2))
    renamed = os.path.join(str(tmp_path), "Task09_Two_Parts")
    os.rename(task, renamed)
    with pytest.raises(NnsslError, match="Task09_Two_Parts' must be named TaskXX_Name with a single underscore"):
        convert_msd(renamed, progress=False)
    os.rename(renamed, task)
    os.makedirs(os.path.join(nnunet_env["nnUNet_results"], "Dataset009_Other"))
    with pytest.raises(NnsslError, match="Dataset ID 9 is already used by Dataset009_Other"):
        convert_msd(task, progress=False)
    with pytest.raises(NnsslError, match="MSD task folder '.*Task01_Missing' does not exist"):
        convert_msd(os.path.join(str(tmp_path), "Task01_Missing"), progress=False)


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f in out for f in ("-i", "-d", "-np", "--overwrite"))
