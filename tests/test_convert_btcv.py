"""nnssl_convert_btcv: BTCV original layout -> nnU-Net raw dataset."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import snapshot, write_image

from nnssl.cli.convert_btcv import main
from nnssl.dataset_conversion import btcv
from nnssl.dataset_conversion.btcv import convert_btcv
from nnssl.dataset_conversion.validation import validate_raw_dataset
from nnssl.errors import NnsslError

# a 90-degree rotation about z plus an axis flip: a direction nothing would produce by accident
ODD_DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SHAPE = (6, 10, 12)  # [Z, Y, X]


def make_btcv(root, rng, train=(1, 2, 3), test=(61,)):
    """A tiny BTCV RawData tree; case 2 has an odd direction, case 3 is stored as uncompressed .nii.
    Returns {case number: (image [Z, Y, X], label or None)}."""
    cases = {}
    for num in list(train) + list(test):
        img = rng.integers(-1000, 1500, SHAPE).astype(np.int16)
        lab = rng.integers(0, 14, SHAPE).astype(np.uint8)
        geom = dict(spacing=(0.7 + 0.01 * num, 0.8, 3.0), origin=(-100.5 + num, 20.25, -7.0),
                    direction=ODD_DIRECTION if num == 2 else None)
        ext = ".nii" if num == 3 else ".nii.gz"
        part = "Training" if num in train else "Testing"
        os.makedirs(os.path.join(root, part, "img"), exist_ok=True)
        write_image(os.path.join(root, part, "img", f"img{num:04d}{ext}"), img, **geom)
        if num in train:
            os.makedirs(os.path.join(root, part, "label"), exist_ok=True)
            write_image(os.path.join(root, part, "label", f"label{num:04d}{ext}"), lab, **geom)
        cases[num] = (img, lab if num in train else None)
    return cases


@pytest.fixture
def raw_data(tmp_path):
    root = tmp_path / "RawData"
    cases = make_btcv(str(root), np.random.default_rng(0))
    return str(root), cases


def assert_same_volume(a_path, b_path):
    a, b = sitk.ReadImage(a_path), sitk.ReadImage(b_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def test_round_trip_preserves_voxels_and_geometry(nnunet_env, raw_data):
    src, cases = raw_data
    out = convert_btcv(src, progress=False)
    assert out == os.path.join(nnunet_env["nnUNet_raw"], "Dataset001_BTCV")
    assert sorted(os.listdir(os.path.join(out, "imagesTr"))) == [f"BTCV_000{i}_0000.nii.gz" for i in (1, 2, 3)]
    assert sorted(os.listdir(os.path.join(out, "labelsTr"))) == [f"BTCV_000{i}.nii.gz" for i in (1, 2, 3)]
    assert os.listdir(os.path.join(out, "imagesTs")) == ["BTCV_0061_0000.nii.gz"]
    for num in (1, 2, 3):
        ext = ".nii" if num == 3 else ".nii.gz"
        assert_same_volume(f"{src}/Training/img/img{num:04d}{ext}", f"{out}/imagesTr/BTCV_{num:04d}_0000.nii.gz")
        assert_same_volume(f"{src}/Training/label/label{num:04d}{ext}", f"{out}/labelsTr/BTCV_{num:04d}.nii.gz")
        written = sitk.ReadImage(f"{out}/imagesTr/BTCV_{num:04d}_0000.nii.gz")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), cases[num][0])
    assert sitk.ReadImage(f"{out}/imagesTr/BTCV_0002_0000.nii.gz").GetDirection() == ODD_DIRECTION
    assert_same_volume(f"{src}/Testing/img/img0061.nii.gz", f"{out}/imagesTs/BTCV_0061_0000.nii.gz")
    validate_raw_dataset(out, full=True, progress=False)  # the output is a valid nnU-Net raw dataset
    assert not [f for f in os.listdir(nnunet_env["nnUNet_raw"]) if f.startswith(".")]  # no staging left


def test_dataset_json(nnunet_env, raw_data):
    out = convert_btcv(raw_data[0], dataset_id=17, progress=False)
    assert os.path.basename(out) == "Dataset017_BTCV"
    with open(os.path.join(out, "dataset.json"), encoding="utf-8") as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == {
        "background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5,
        "liver": 6, "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_and_splenic_veins": 10,
        "pancreas": 11, "right_adrenal_gland": 12, "left_adrenal_gland": 13}
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert raw_data[0] in dj["nnssl_source"]


def test_id_handling(nnunet_env, raw_data):
    os.makedirs(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset001_Other"))
    os.makedirs(os.path.join(nnunet_env["nnUNet_raw"], "Dataset002_More"))
    with pytest.raises(NnsslError, match="Dataset ID 1 is already used by Dataset001_Other"):
        convert_btcv(raw_data[0], dataset_id=1, progress=False)
    assert os.path.basename(convert_btcv(raw_data[0], progress=False)) == "Dataset003_BTCV"  # lowest free
    with pytest.raises(NnsslError, match="Dataset003_BTCV' already exists"):  # default: reuse the name's ID
        convert_btcv(raw_data[0], progress=False)
    out = convert_btcv(raw_data[0], name="Abdomen", progress=False)
    assert os.path.basename(out) == "Dataset004_Abdomen"
    assert os.listdir(os.path.join(out, "labelsTr"))[0].startswith("Abdomen_")


def test_overwrite_replaces_existing(nnunet_env, raw_data):
    out = convert_btcv(raw_data[0], progress=False)
    marker = os.path.join(out, "stale.txt")
    open(marker, "w", encoding="utf-8").close()
    assert convert_btcv(raw_data[0], overwrite=True, progress=False) == out
    assert not os.path.exists(marker) and len(os.listdir(os.path.join(out, "imagesTr"))) == 3
    assert sorted(os.listdir(nnunet_env["nnUNet_raw"])) == ["Dataset001_BTCV"]


def test_interrupted_run_resumes(nnunet_env, raw_data, monkeypatch):
    copied = []
    real_copy = btcv._copy_volume

    def flaky_copy(src, dst):
        if len(copied) == 4:
            raise KeyboardInterrupt
        copied.append(dst)
        real_copy(src, dst)

    monkeypatch.setattr(btcv, "_copy_volume", flaky_copy)
    with pytest.raises(KeyboardInterrupt):
        convert_btcv(raw_data[0], progress=False)
    assert os.listdir(nnunet_env["nnUNet_raw"]) == [".partial-Dataset001_BTCV"]  # no dataset folder yet
    copied.clear()
    monkeypatch.setattr(btcv, "_copy_volume", lambda s, d: (copied.append(d), real_copy(s, d)))
    out = convert_btcv(raw_data[0], progress=False)
    assert len(copied) == 3  # 7 files in total, 4 kept from the first run
    assert sorted(os.listdir(nnunet_env["nnUNet_raw"])) == ["Dataset001_BTCV"]
    validate_raw_dataset(out, full=True, progress=False)


def _nan_image(src):
    p = f"{src}/Training/img/img0002.nii.gz"
    img = sitk.ReadImage(p)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[1, 1, 1] = np.nan
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, p)
    return p


def _bad_label_value(src):
    p = f"{src}/Training/label/label0001.nii.gz"
    img = sitk.ReadImage(p)
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 14
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, p)
    return p


def _shifted_label(src):
    p = f"{src}/Training/label/label0002.nii.gz"
    img = sitk.ReadImage(p)
    img.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(img, p)
    return p


def _truncated(src):
    p = f"{src}/Testing/img/img0061.nii.gz"
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return p


def _missing_label(src):
    p = f"{src}/Training/label/label0001.nii.gz"
    os.remove(p)
    return f"{src}/Training/img/img0001.nii.gz"


def _two_d(src):
    p = f"{src}/Training/img/img0001.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.int16)), p)
    return p


def _empty(src):
    for sub in ("img", "label"):
        for f in os.listdir(f"{src}/Training/{sub}"):
            os.remove(f"{src}/Training/{sub}/{f}")
    return f"{src}/Training/img"


@pytest.mark.parametrize("corrupt", [_nan_image, _bad_label_value, _shifted_label, _truncated, _missing_label,
                                     _two_d, _empty])
def test_bad_input_fails_cleanly(nnunet_env, raw_data, corrupt, capsys):
    bad_file = corrupt(raw_data[0])
    before = snapshot(raw_data[0])
    with pytest.raises(SystemExit) as e:
        main(["-i", raw_data[0]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nnssl error" in err and bad_file in err and "Traceback" not in err
    assert snapshot(raw_data[0]) == before  # input untouched
    assert os.listdir(nnunet_env["nnUNet_raw"]) == []  # nothing written, not even a staging folder


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(flag in out for flag in ("-i", "-d", "--name", "--overwrite"))
