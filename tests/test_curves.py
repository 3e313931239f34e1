"""Learning curves from a real (2-epoch) nnU-Net fine-tuning's fold folder: checkpoint and text-log sources."""
import json
import os
import shutil

import pytest

from nnssl.errors import NnsslError
from nnssl.evaluation.compare import compare_runs
from nnssl.evaluation.curves import learning_curves

DS = "Dataset001_Blobs"


@pytest.fixture(scope="module")
def fold_dir(pretrain_tree, tmp_path_factory):
    """nnsslTrainer (nnU-Net's recipe: SGD lr 1e-2, poly) for 2 epochs of 2 iterations, once per module,
    without the final sliding-window validation (not what these tests read)."""
    from nnssl.training.finetune import RunOptions, apply_run_options, build_trainer

    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed"):
            mp.setenv(var, pretrain_tree[var])
        mp.setenv("nnUNet_results", str(tmp_path_factory.mktemp("curves") / "results"))
        run = build_trainer(DS, "3d_fullres", "all", device="cpu")
        apply_run_options(run.trainer, RunOptions(epochs=2, iterations_per_epoch=2, val_iterations=1))
        run.trainer.run_training()
    return run.fold_dir


def test_curves_from_a_finished_training_and_from_its_text_log(fold_dir, tmp_path):
    c = learning_curves(fold_dir)
    assert c["source"] == os.path.join(fold_dir, "checkpoint_final.pth")
    assert c["epoch"] == [0, 1] and c["iterations_per_epoch"] == 2  # from nnU-Net's debug.json
    assert c["iteration"] == [2, 4]  # logged at the end of each epoch
    assert c["lrs"] == pytest.approx([1e-2, 1e-2 * (1 - 1 / 2) ** 0.9])  # nnU-Net's poly, epoch 0 and 1 of 2
    assert all(len(c[k]) == 2 for k in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice"))
    assert all(0 <= d <= 1 for d in c["mean_fg_dice"])
    # nnU-Net's moving average: ema_0 = dice_0, ema_1 = 0.9 ema_0 + 0.1 dice_1
    assert c["ema_fg_dice"][0] == pytest.approx(c["mean_fg_dice"][0])
    assert c["ema_fg_dice"][1] == pytest.approx(0.9 * c["mean_fg_dice"][0] + 0.1 * c["mean_fg_dice"][1])
    assert len(c["dice_per_class_or_region"]) == 2 and len(c["dice_per_class_or_region"][0]) == 2  # 2 labels

    running = tmp_path / "running"  # a training still going: no checkpoint_final yet, only the text log
    shutil.copytree(fold_dir, running)
    os.remove(running / "checkpoint_final.pth")
    os.remove(running / "checkpoint_best.pth")
    t = learning_curves(str(running))
    assert t["source"].startswith(str(running / "training_log_"))
    for key in ("train_losses", "val_losses"):
        assert t[key] == pytest.approx(c[key], abs=5e-5)  # the log prints 4 decimals
    assert t["lrs"] == pytest.approx(c["lrs"], abs=5e-6)  # and the lr with 5
    assert t["iteration"] == [2, 4]
    assert learning_curves(str(running), iterations_per_epoch=250)["iteration"] == [250, 500]


def test_compare_finds_the_training_of_a_validation_folder(fold_dir):
    validation = os.path.join(fold_dir, "validation")
    os.makedirs(validation, exist_ok=True)
    with open(os.path.join(validation, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"metric_per_case": [{"metrics": {"1": {"Dice": 0.5}, "2": {"Dice": 0.7}}}],
                   "foreground_mean": {"Dice": 0.6}}, f)
    out = compare_runs([validation], os.path.join(fold_dir, "report"))
    assert out["runs"][0].curves["iteration"] == [2, 4]
    assert os.path.isfile(out["png"]) and os.path.isfile(out["svg"])


def test_folder_without_a_training_is_refused(tmp_path):
    with pytest.raises(NnsslError, match="holds no learning curves"):
        learning_curves(str(tmp_path))
    broken = tmp_path / "checkpoint_final.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(NnsslError, match="Cannot read the learning curves"):
        learning_curves(str(tmp_path))
