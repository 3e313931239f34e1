"""Every command that writes checks its output location up front: exit 2 and the fix, not a traceback.

The tests run as any user (also root, whom permissions do not stop), so the unwritable location is
one below a regular file, which nobody can create; the permission branch is checked with the OS's
answer replaced."""
import json
import os

import pytest

from nnssl.errors import NnsslError
from nnssl.io import check_writable


@pytest.fixture
def blocked(tmp_path):
    """A regular file where an output folder would have to be created."""
    path = tmp_path / "not_a_folder"
    path.write_text("a file in the way", encoding="utf-8")
    return str(path)


def _dataset_json(tmp_path):
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 1,
                             "file_ending": ".nii.gz"}), encoding="utf-8")
    return str(p)


def _commands(tmp_path, blocked, env):
    from nnssl.cli import compare, evaluate, export_pretrained, plan_and_preprocess, predict, pretrain, train

    os.makedirs(os.path.join(env["nnUNet_raw"], "Dataset001_Blobs"))
    os.makedirs(os.path.join(env["nnUNet_preprocessed"], "Dataset001_Blobs"))
    out = os.path.join(blocked, "out")
    return {
        "predict": (predict.main, ["-i", str(tmp_path), "-o", out, "-d", "1", "-c", "3d_fullres", "-f", "0"]),
        "evaluate": (evaluate.main, ["-ref", str(tmp_path), "-pred", str(tmp_path), "-d", _dataset_json(tmp_path),
                                     "-o", os.path.join(out, "summary.json")]),
        "compare": (compare.main, [str(tmp_path), "-o", os.path.join(out, "REPORT")]),
        "export": (export_pretrained.main, [str(tmp_path / "checkpoint_final.pth"), "-o", os.path.join(out, "m.zip")]),
        "pretrain": (pretrain.main, ["-d", "1", "-m", "volume_fusion", "-o", out]),
        "plan": (plan_and_preprocess.main, ["-d", "1"]),  # nnUNet_preprocessed is below the file
        "train": (train.main, ["1", "3d_fullres", "0"]),  # nnUNet_results is below the file
    }


@pytest.mark.parametrize("command", ["predict", "evaluate", "compare", "export", "pretrain", "plan", "train"])
def test_unwritable_output_exits_2_before_any_work(nnunet_env, tmp_path, blocked, monkeypatch, capsys, command):
    main, argv = _commands(tmp_path, blocked, nnunet_env)[command]
    if command == "plan":
        monkeypatch.setenv("nnUNet_preprocessed", os.path.join(blocked, "preprocessed"))
    if command == "train":
        monkeypatch.setenv("nnUNet_results", os.path.join(blocked, "results"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot be created: {blocked} is a file, not a folder. Choose another location" in err, err


def test_read_only_folder_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what the OS answers for a read-only folder
    with pytest.raises(NnsslError, match=rf"The output folder \(-o\) {tmp_path}/new/out is not writable: {tmp_path} "
                                         rf"is read-only .*chmod u\+w {tmp_path}"):
        check_writable(str(tmp_path / "new" / "out"), "The output folder (-o)")
