"""Folder evaluation: nnU-Net's summary.json extended with HD95/ASSD, checked by hand."""
import json
import os

import numpy as np
import pytest
from conftest import write_image

from nnssl.cli.evaluate import main as evaluate_main
from nnssl.errors import NnsslError
from nnssl.evaluation.evaluate import evaluate_folder

SHAPE = (6, 6, 6)  # [Z, Y, X]
SPACING_XYZ = (0.8, 0.8, 3.0)  # SimpleITK order: z is the 3 mm axis
DATASET = "Dataset005_Eval"


def two_cube(z0, y0=1, x0=1):
    m = np.zeros(SHAPE, bool)
    m[z0:z0 + 2, y0:y0 + 2, x0:x0 + 2] = True
    return m


def seg(label1=None, label2=None):
    s = np.zeros(SHAPE, np.uint8)
    if label1 is not None:
        s[label1] = 1
    if label2 is not None:
        s[label2] = 2
    return s


@pytest.fixture
def folders(nnunet_env, tmp_path):
    """Two cases, labels 1 and 2, and predictions with hand-known Dice/HD95/ASSD.

    c1: label 1 predicted one voxel too far along z (2-cubes: TP 4, FP 4, FN 4 -> Dice 0.5;
        surface distances in each direction [0]*4 + [3 mm]*4 -> HD95 3.0, ASSD 1.5);
        label 2 exact (Dice 1, HD95 0, ASSD 0).
    c2: label 1 exact; label 2 not predicted (Dice 0, HD95/ASSD undefined = NaN).
    """
    root = os.path.join(nnunet_env["nnUNet_raw"], DATASET)
    ref, pred = os.path.join(root, "labelsTr"), str(tmp_path / "pred")
    os.makedirs(ref)
    os.makedirs(pred)
    with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
                   "numTraining": 2, "file_ending": ".nii.gz"}, f)
    a, b = two_cube(0), two_cube(3, 3, 3)
    write_image(os.path.join(ref, "c1.nii.gz"), seg(a, b), SPACING_XYZ)
    write_image(os.path.join(ref, "c2.nii.gz"), seg(a, b), SPACING_XYZ)
    write_image(os.path.join(pred, "c1.nii.gz"), seg(two_cube(1), b), SPACING_XYZ)
    write_image(os.path.join(pred, "c2.nii.gz"), seg(a, None), SPACING_XYZ)
    return ref, pred


def test_summary_has_nnunet_metrics_plus_hand_computed_hd95_assd(folders):
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    ref, pred = folders
    evaluate_folder(ref, pred, "Eval")
    s = load_summary_json(os.path.join(pred, "summary.json"))  # nnU-Net can still read it
    cases = {os.path.basename(c["prediction_file"]): c["metrics"] for c in s["metric_per_case"]}
    assert cases["c1.nii.gz"][1]["Dice"] == pytest.approx(0.5)
    assert cases["c1.nii.gz"][1]["IoU"] == pytest.approx(1 / 3)
    assert (cases["c1.nii.gz"][1]["TP"], cases["c1.nii.gz"][1]["FP"]) == (4, 4)
    # 3.0 only if the 3 mm spacing is applied to the array's z axis (sitk spacing is x, y, z)
    assert cases["c1.nii.gz"][1]["HD95"] == pytest.approx(3.0)
    assert cases["c1.nii.gz"][1]["ASSD"] == pytest.approx(1.5)
    assert cases["c1.nii.gz"][2]["HD95"] == 0.0 and cases["c1.nii.gz"][2]["Dice"] == 1.0
    assert cases["c2.nii.gz"][2]["Dice"] == 0.0
    assert np.isnan(cases["c2.nii.gz"][2]["HD95"]) and np.isnan(cases["c2.nii.gz"][2]["ASSD"])

    m1, m2 = s["mean"][1], s["mean"][2]
    assert m1["Dice"] == pytest.approx(0.75) and m1["Dice_std"] == pytest.approx(0.25)
    assert m1["HD95"] == pytest.approx(1.5) and m1["HD95_std"] == pytest.approx(1.5) and m1["HD95_n_nan"] == 0
    assert m1["ASSD"] == pytest.approx(0.75) and m1["ASSD_std"] == pytest.approx(0.75)
    assert m2["Dice"] == pytest.approx(0.5) and m2["Dice_std"] == pytest.approx(0.5)
    assert m2["HD95"] == 0.0 and m2["HD95_std"] == 0.0 and m2["HD95_n_nan"] == 1

    fg = s["foreground_mean"]
    assert fg["Dice"] == pytest.approx(0.625)  # nnU-Net: mean of the class means
    assert fg["Dice_std"] == pytest.approx(0.125)  # per-case foreground means 0.75 and 0.5
    assert fg["HD95"] == pytest.approx(0.75)  # nan-aware mean of class means 1.5 and 0.0
    assert fg["HD95_std"] == pytest.approx(0.75)  # per-case foreground means 1.5 and 0.0
    assert fg["HD95_n_nan"] == 1


def test_ignore_label_voxels_do_not_count(folders, nnunet_env):
    # Reference c1 marks voxel (5,5,5) with the ignore label 3 and the prediction puts label 1
    # there: far from the cube, it would raise label 1's HD95/ASSD if it were counted.
    ref, pred = folders
    dj_file = os.path.join(nnunet_env["nnUNet_raw"], DATASET, "dataset.json")
    with open(dj_file, encoding="utf-8") as f:
        dj = json.load(f)
    dj["labels"]["ignore"] = 3
    r, p = seg(two_cube(0), two_cube(3, 3, 3)), seg(two_cube(1), two_cube(3, 3, 3))
    r[5, 5, 5], p[5, 5, 5] = 3, 1
    write_image(os.path.join(ref, "c1.nii.gz"), r, SPACING_XYZ)
    write_image(os.path.join(pred, "c1.nii.gz"), p, SPACING_XYZ)
    result = evaluate_folder(ref, pred, dj)
    c1 = next(c["metrics"][1] for c in result["metric_per_case"] if c["prediction_file"].endswith("c1.nii.gz"))
    assert c1["Dice"] == pytest.approx(0.5)
    assert c1["HD95"] == pytest.approx(3.0) and c1["ASSD"] == pytest.approx(1.5)


def test_cli_resolves_dataset_and_prints_table(folders, tmp_path, capsys):
    ref, pred = folders
    out = str(tmp_path / "eval" / "s.json")
    with pytest.raises(SystemExit) as e:
        evaluate_main(["-ref", ref, "-pred", pred, "-d", "5", "-o", out])
    assert e.value.code == 0
    assert os.path.isfile(out) and not os.path.exists(os.path.join(pred, "summary.json"))
    printed = capsys.readouterr().out
    assert "1 liver" in printed and "2 spleen" in printed and "foreground mean" in printed
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".tmp")]


def test_missing_prediction_is_an_error(folders):
    ref, pred = folders
    os.remove(os.path.join(pred, "c2.nii.gz"))
    with pytest.raises(NnsslError, match="c2.nii.gz"):
        evaluate_folder(ref, pred, "Eval")


def test_extra_prediction_is_an_error_unless_ignored(folders):
    ref, pred = folders
    write_image(os.path.join(pred, "c9.nii.gz"), seg(two_cube(0)), SPACING_XYZ)
    with pytest.raises(NnsslError, match="c9.nii.gz.*--ignore_extra"):
        evaluate_folder(ref, pred, "Eval")
    result = evaluate_folder(ref, pred, "Eval", ignore_extra=True)
    names = sorted(os.path.basename(c["prediction_file"]) for c in result["metric_per_case"])
    assert names == ["c1.nii.gz", "c2.nii.gz"]
    assert all(os.path.dirname(c["prediction_file"]) == os.path.abspath(pred) for c in result["metric_per_case"])
    assert result["mean"][1]["Dice"] == pytest.approx(0.75)


def test_label_value_not_in_dataset_json_names_file_and_value(folders):
    ref, pred = folders
    bad = seg(two_cube(0))
    bad[5, 5, 5] = 7
    write_image(os.path.join(pred, "c2.nii.gz"), bad, SPACING_XYZ)
    with pytest.raises(NnsslError, match=r"c2\.nii\.gz: label values \[7\] are not in dataset.json \(allowed: "
                                         r"\[0, 1, 2\]\)"):  # plain numbers, not np.int64(0)
        evaluate_folder(ref, pred, "Eval")


def test_truncated_prediction_is_refused(folders, capsys):
    """ITK reads a cut-off .nii.gz zero-filled: it would be scored as an empty prediction."""
    ref, pred = folders
    p = os.path.join(pred, "c2.nii.gz")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) - 6])  # into the gzip trailer: the voxels decode, the stream does not end
    with pytest.raises(SystemExit) as e:
        evaluate_main(["-ref", ref, "-pred", pred, "-d", "Eval"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "c2.nii.gz' is a truncated or corrupt gzip" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(pred, "summary.json"))


def test_shape_and_geometry_mismatch_name_the_case(folders):
    ref, pred = folders
    write_image(os.path.join(pred, "c1.nii.gz"), np.zeros((5, 6, 6), np.uint8), SPACING_XYZ)
    write_image(os.path.join(pred, "c2.nii.gz"), seg(two_cube(0)), (0.8, 0.8, 2.0))
    with pytest.raises(NnsslError) as e:
        evaluate_folder(ref, pred, "Eval")
    msg = str(e.value)
    assert "c1.nii.gz: prediction shape (5, 6, 6) != reference shape (6, 6, 6)" in msg
    assert "c2.nii.gz: geometry differs" in msg and "spacing" in msg


def test_empty_prediction_folder_and_unknown_dataset(folders, tmp_path):
    ref, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NnsslError, match="contains no '.nii.gz' files"):
        evaluate_folder(ref, str(empty), "Eval")
    with pytest.raises(NnsslError, match="not found"):
        evaluate_folder(ref, str(empty), "NoSuchDataset")


def test_cli_bad_input_exits_2(folders, capsys):
    ref, pred = folders
    os.remove(os.path.join(pred, "c1.nii.gz"))
    with pytest.raises(SystemExit) as e:
        evaluate_main(["-ref", ref, "-pred", pred, "-d", "Eval"])
    assert e.value.code == 2
    assert "c1.nii.gz" in capsys.readouterr().err
