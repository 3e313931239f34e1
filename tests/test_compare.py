"""Run comparison: report files from two hand-made summaries, numbers checked by hand."""
import csv
import json
import os

import pytest

from nnssl.cli.compare import main as compare_main
from nnssl.errors import NnsslError
from nnssl.evaluation.compare import compare_runs

NAN = float("nan")


def case(metrics):
    return {"reference_file": "r", "prediction_file": "p",
            "metrics": {k: dict(zip(("Dice", "HD95", "ASSD"), v)) for k, v in metrics.items()}}


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture
def runs(tmp_path):
    # Run A (nnssl summary, described by nnssl_run.json), values (Dice, HD95, ASSD):
    #   case 1: class 1 (0.8, 4.0, 1.0), class 2 (0.6, NaN, NaN)
    #   case 2: class 1 (0.6, 2.0, 0.5), class 2 (0.4, 6.0, 2.0)
    # -> class 1: Dice 0.7 ± 0.1, HD95 3.0 ± 1.0, ASSD 0.75 ± 0.25
    #    class 2: Dice 0.5 ± 0.1, HD95 6.0 ± 0.0 (1 NaN), ASSD 2.0 ± 0.0 (1 NaN)
    #    mean: Dice 0.6 (foreground_mean) ± std(per-case means 0.7, 0.5) = 0.1;
    #          HD95 4.5 (foreground_mean) ± std(per-case means 4.0, 4.0) = 0.0
    a = tmp_path / "a"
    write(str(a / "summary.json"), {
        "metric_per_case": [case({"1": (0.8, 4.0, 1.0), "2": (0.6, NAN, NAN)}),
                            case({"1": (0.6, 2.0, 0.5), "2": (0.4, 6.0, 2.0)})],
        "mean": {"1": {"Dice": 0.7}, "2": {"Dice": 0.5}},
        "foreground_mean": {"Dice": 0.6, "HD95": 4.5, "ASSD": 1.375}})
    write(str(a / "nnssl_run.json"), {"label": "scratch", "architecture": "plainconvunet", "method": "none",
                                      "pretraining_data": "none"})
    # Run B: a stock nnU-Net summary (Dice only) inside a result folder with its dataset.json.
    #   case 1: class 1 0.9, class 2 0.7; case 2: class 1 0.7, class 2 NaN (absent in both)
    # -> class 1: 0.8 ± 0.1; class 2: 0.7 ± 0.0 (1 NaN); mean 0.75 ± std(0.8, 0.7) = 0.05
    res = tmp_path / "results" / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    write(str(res / "dataset.json"), {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"})
    b = res / "fold_0" / "validation" / "summary.json"
    write(str(b), {"metric_per_case": [{"metrics": {"1": {"Dice": 0.9}, "2": {"Dice": 0.7}}},
                                       {"metrics": {"1": {"Dice": 0.7}, "2": {"Dice": NAN}}}],
                   "mean": {"1": {"Dice": 0.8}, "2": {"Dice": 0.7}}, "foreground_mean": {"Dice": 0.75}})
    return str(a), str(b)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_and_numbers(runs, tmp_path, capsys):
    a, b = runs
    prefix = str(tmp_path / "out" / "report")
    with pytest.raises(SystemExit) as e:
        compare_main([a, b, "-o", prefix])
    assert e.value.code == 0
    label_b = "nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation"
    rows = read_csv(prefix + ".csv")
    assert [(r["run"], r["class"]) for r in rows] == [("scratch", "1"), ("scratch", "2"), ("scratch", "mean"),
                                                      (label_b, "1"), (label_b, "2"), (label_b, "mean")]
    expected = {  # (run, class): (Dice mean, std, n_nan, HD95 mean, std, n_nan)
        ("scratch", "1"): (0.7, 0.1, 0, 3.0, 1.0, 0),
        ("scratch", "2"): (0.5, 0.1, 0, 6.0, 0.0, 1),
        ("scratch", "mean"): (0.6, 0.1, 0, 4.5, 0.0, 1),
        (label_b, "1"): (0.8, 0.1, 0, NAN, NAN, 2),
        (label_b, "2"): (0.7, 0.0, 1, NAN, NAN, 2),
        (label_b, "mean"): (0.75, 0.05, 1, NAN, NAN, 4),
    }
    for r in rows:
        got = (float(r["Dice_mean"]), float(r["Dice_std"]), int(r["Dice_n_nan"]),
               float(r["HD95_mean"]), float(r["HD95_std"]), int(r["HD95_n_nan"]))
        assert got == pytest.approx(expected[(r["run"], r["class"])], nan_ok=True), (r["run"], r["class"])
    assert float(rows[0]["ASSD_mean"]) == pytest.approx(0.75) and float(rows[0]["ASSD_std"]) == pytest.approx(0.25)
    assert rows[0]["architecture"] == "plainconvunet" and rows[3]["method"] == "unknown"
    assert rows[3]["class_name"] == "liver" and rows[0]["class_name"] == ""

    md = open(prefix + ".md").read()
    assert "| scratch | plainconvunet | none | none | 2 | 0.600 ± 0.100 | 4.50 ± 0.00 (1 undef.) |" in md
    assert f"| {label_b} | unknown | unknown | unknown | 2 | 0.750 ± 0.050 | n/a | n/a |" in md
    assert "| run | 1 liver | 2 spleen |" in md and "| scratch | 0.700 ± 0.100 | 0.500 ± 0.100 |" in md
    assert "| scratch | plainconvunet" in capsys.readouterr().out
    with open(prefix + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "out")) == ["report.csv", "report.md", "report.png"]


def test_rows_follow_argument_order_and_labels_stay_distinct(runs, tmp_path):
    a, b = runs
    out = compare_runs([b, a, a], str(tmp_path / "r.md"))
    assert out["csv"] == str(tmp_path / "r.csv")
    order = [r["run"] for r in read_csv(out["csv"]) if r["class"] == "mean"]
    assert order == ["nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/validation", "scratch", "scratch (2)"]


def test_bad_inputs_name_the_path(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NnsslError, match="has no summary.json"):
        compare_runs([str(empty)], str(tmp_path / "r"))
    broken = tmp_path / "broken" / "summary.json"
    write(str(broken), {"mean": {}})
    with pytest.raises(NnsslError, match="no 'metric_per_case'"):
        compare_runs([str(broken)], str(tmp_path / "r"))
    with pytest.raises(SystemExit) as e:
        compare_main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "r")])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.md")
