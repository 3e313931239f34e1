"""nnssl_demo's closing messages: the pictures it lists exist, and a worse pretrained start is said plainly.

(The whole demo is run by hand / in the benchmarks: ``nnssl_demo --fast``; these tests use a
hand-made output folder so that they take milliseconds.)
"""
import json
import os
import re

from nnssl.demo import existing_pictures, pictures_message, verdict


def _run_folder(root, label, dice, with_progress=True):
    fold = os.path.join(root, "runs", label, "nnUNet_results", "Dataset001_BTCV", "T__P__3d_fullres", "fold_all")
    os.makedirs(fold)
    if with_progress:
        open(os.path.join(fold, "progress.png"), "wb").close()
    pred = os.path.join(root, "runs", label, "test_predictions")
    os.makedirs(pred)
    with open(os.path.join(pred, "nnssl_run.json"), "w", encoding="utf-8") as f:
        json.dump({"fold_dir": fold}, f)
    with open(os.path.join(pred, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"foreground_mean": {"Dice": dice}}, f)
    return pred


def test_final_message_lists_existing_pictures_only(tmp_path):
    root = str(tmp_path)
    for name in ("report.png", "pretext.png"):
        open(os.path.join(root, name), "wb").close()
    runs = [_run_folder(root, "scratch", 0.3), _run_folder(root, "volume_fusion", 0.2, with_progress=False)]
    message = pictures_message(root, runs)
    listed = re.findall(r"^  (/\S+\.png)$", message, flags=re.M)
    # report, pretext and the scratch run's progress.png exist; the pretrained run's and the
    # pretraining's progress.png do not, so they are not listed.
    assert sorted(listed) == sorted([os.path.join(root, "report.png"), os.path.join(root, "pretext.png"),
                                     os.path.join(os.path.dirname(runs[0]), "nnUNet_results", "Dataset001_BTCV",
                                                  "T__P__3d_fullres", "fold_all", "progress.png")])
    assert all(os.path.isfile(p) for p in listed)
    assert len(existing_pictures(root, runs)) == 3
    # every listed picture is followed by one sentence saying what it shows
    assert len(re.findall(r"^      \S.*\.$", message, flags=re.M)) == 3


def test_verdict_says_worse_plainly(tmp_path):
    runs = [_run_folder(str(tmp_path), "scratch", 0.30), _run_folder(str(tmp_path), "volume_fusion", 0.25)]
    text = verdict(runs, "volume_fusion")
    assert "WORSE than scratch" in text and "0.250 vs 0.300" in text and "-0.050" in text
    runs = [_run_folder(str(tmp_path / "b"), "scratch", 0.30), _run_folder(str(tmp_path / "b"), "vf", 0.35)]
    assert "better than scratch" in verdict(runs, "vf")
