"""Quiet console: nnU-Net's plans dumps and module lists go to the log file, everything else to the screen."""
import os

import pytest

from nnssl.cli.plan_and_preprocess import main as plan_main
from nnssl.quiet import details_to_log

DUMP = "{'data_identifier': 'nnUNetPlans_3d_fullres', 'batch_size': 2, " + "'x': 1, " * 40 + "}"
MODULE = ["PlainConvUNet(", "  (encoder): PlainConvEncoder(", "    (stages): Sequential()", "  )", ")"]


def test_details_go_to_the_log_only(tmp_path, capsys):
    log = str(tmp_path / "sub" / "details.log")
    with details_to_log(log, title="t"):
        print("Planning Dataset001_X for architecture 'plainconvunet'...")
        print("3D fullres U-Net configuration:")
        print(DUMP)
        print()  # the blank line after a dump goes with it
        print("Using <class 'nnunetv2.imageio.simpleitk_reader_writer.SimpleITKIO'> as reader/writer")
        print("\n".join(MODULE))
        print("2026-12-01 08:55:31.917850: train_loss 1.6182")
        print("2026-12-01 08:55:31.917850: This is the configuration used by this training:")
        print("no newline at the end", end="")
    out = capsys.readouterr().out
    assert out.splitlines() == ["Planning Dataset001_X for architecture 'plainconvunet'...",
                                "2026-12-01 08:55:31.917850: train_loss 1.6182", "no newline at the end"]
    text = open(log, encoding="utf-8").read()
    for line in ["3D fullres U-Net configuration:", DUMP, *MODULE, "train_loss 1.6182", "no newline at the end"]:
        assert line in text
    assert text.startswith("\n===== ") and text.splitlines()[1].endswith(" t")


def test_verbose_shows_everything_and_still_logs(tmp_path, capsys):
    log = str(tmp_path / "details.log")
    with details_to_log(log, verbose=True):
        print(DUMP)
    assert capsys.readouterr().out == DUMP + "\n" and DUMP in open(log, encoding="utf-8").read()
    with details_to_log(None):  # no log: nothing is filtered
        print(DUMP)
    assert capsys.readouterr().out == DUMP + "\n"


def test_plan_and_preprocess_is_quiet_by_default(blob_dataset, capsys):
    with pytest.raises(SystemExit) as e:
        plan_main(["-d", "1", "--preset", "tiny", "-np", "1", "--no_pp", "--no_pbar"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "U-Net configuration" not in out and max(map(len, out.splitlines())) < 240
    assert "nnUNetPlans.json 3d_fullres: patch [" in out  # a one-line summary instead of the dictionaries
    log = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset001_Blobs", "nnssl_plan_and_preprocess.log")
    assert f"details: {log} (--verbose" in out
    assert "3D fullres U-Net configuration:" in open(log, encoding="utf-8").read()
    with pytest.raises(SystemExit):
        plan_main(["-d", "1", "--preset", "tiny", "-np", "1", "--no_pp", "--no_pbar", "--verbose"])
    assert "3D fullres U-Net configuration:" in capsys.readouterr().out
