"""Which cases a checkpoint was pretrained on, -pd intask --fold K, and the leakage warning of nnssl_train
(nnssl/training/pretraining_cases.py, injection.py).

Data: Dataset001_Blobs with 5 training cases (enough for nnU-Net's 5-fold split) and 1 test case, a
2-volume unlabeled pool; tiny plainconvunet; every pretraining is 1 Volume Fusion iteration.
"""
import hashlib
import json
import os
import shutil

import pytest
import torch

from conftest import write_raw_dataset
from nnssl.errors import NnsslError

DS, POOL = "Dataset001_Blobs", "Dataset002_Pool"
TRAIN = ["case_000", "case_001", "case_002", "case_003", "case_004"]  # case_005 is the imagesTs case
# A hand-made split: fold 0 validates on case_001 and case_004.
SPLITS = [{"train": ["case_000", "case_002", "case_003"], "val": ["case_001", "case_004"]},
          {"train": ["case_001", "case_002", "case_004"], "val": ["case_000", "case_003"]}]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from nnssl.planning.api import plan_and_preprocess

    root = tmp_path_factory.mktemp("cases")
    env = {var: str(root / sub) for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pp"),
                                                ("nnUNet_results", "results"))}
    with pytest.MonkeyPatch.context() as mp:
        for var, folder in env.items():
            os.makedirs(folder)
            mp.setenv(var, folder)
        mp.setenv("nnUNet_n_proc_DA", "1")
        blobs = write_raw_dataset(env["nnUNet_raw"], n_train=5, n_test=1, shape=(16, 32, 32))
        pool = os.path.join(env["nnUNet_raw"], POOL, "imagesTr")
        os.makedirs(pool)
        for i in range(2):  # copies of two training images under the pool's own names
            shutil.copy(os.path.join(blobs, "imagesTr", f"case_00{i}_0000.nii.gz"),
                        os.path.join(pool, f"u_00{i}_0000.nii.gz"))
        with open(os.path.join(env["nnUNet_raw"], POOL, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": 2,
                       "file_ending": ".nii.gz", "nnssl_unlabeled": True}, f)
        plan_and_preprocess(DS, pretraining=["intask", POOL], preset="tiny", num_processes=1, show_progress=False)
    return env


@pytest.fixture
def env(tree, tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, tree[var])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    os.makedirs(tmp_path / "results")
    splits = os.path.join(tree["nnUNet_preprocessed"], DS, "splits_final.json")
    if os.path.exists(splits):
        os.remove(splits)
    return {**tree, "splits": splits, "tmp": tmp_path}


def write_splits(path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(SPLITS, f)


def pretrain_once(tmp, name, **kw):
    from nnssl.training.pretrainer import pretrain

    return pretrain(DS, "volume_fusion", iterations=1, iterations_per_epoch=1, batch_size=2, device="cpu",
                    num_workers=0, output_folder=str(tmp / name) if name else None, **kw)


def fine_tune_report(checkpoint, fold=0):
    """Inject ``checkpoint`` into fold ``fold``'s trainer; returns nnssl_pretrained.json."""
    from nnssl.training.finetune import build_trainer
    from nnssl.training.injection import inject_pretrained

    run = build_trainer(DS, "3d_fullres", fold, device="cpu")
    run.trainer.initialize()
    inject_pretrained(run.trainer, checkpoint)
    with open(os.path.join(run.fold_dir, "nnssl_pretrained.json"), encoding="utf-8") as f:
        return json.load(f)


def test_checkpoint_records_every_case_it_was_pretrained_on(env):
    folder = pretrain_once(env["tmp"], "all")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["pretraining_cases"] == TRAIN  # imagesTs (case_005) is not pretraining data by default
    assert config["pretraining_includes_test_images"] is False and config["pretraining_fold"] is None
    expected = hashlib.sha256(b"case_000\ncase_001\ncase_002\ncase_003\ncase_004").hexdigest()
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), weights_only=True)
    assert (ckpt["pretraining_cases_sha256"], ckpt["pretraining_cases_count"]) == (expected, 5)
    assert config["pretraining_cases_sha256"] == expected
    with open(os.path.join(folder, "checkpoint_final.json"), encoding="utf-8") as f:
        assert json.load(f)["pretraining_cases_count"] == 5


def test_leakage_warning_names_the_validation_cases_pretrained_on(env, capsys):
    write_splits(env["splits"])
    ckpt = os.path.join(pretrain_once(env["tmp"], "all"), "checkpoint_final.pth")
    capsys.readouterr()
    report = fine_tune_report(ckpt, fold=0)
    assert report["pretraining_cases_in_validation"] == ["case_001", "case_004"]
    out = capsys.readouterr().out
    assert "WARNING pretraining/validation leakage: 2 of the 2 validation cases of fold 0" in out
    assert "case_001, case_004" in out and "nnssl_pretrain -d Dataset001_Blobs -m volume_fusion -pd intask --fold 0" \
        in out


def test_pretraining_per_fold_sees_only_that_folds_training_cases(env, capsys):
    write_splits(env["splits"])
    folder = pretrain_once(env["tmp"], None, fold=0)
    assert folder.endswith("nnsslPretrain__volume_fusion__plainconvunet__nnUNetPlans__3d_fullres__fold0")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["pretraining_cases"] == ["case_000", "case_002", "case_003"] and config["pretraining_fold"] == 0
    capsys.readouterr()
    report = fine_tune_report(os.path.join(folder, "checkpoint_final.pth"), fold=0)
    assert report["pretraining_cases_in_validation"] == []
    assert "leakage" not in capsys.readouterr().out
    # the same checkpoint on fold 1 validates on case_000 and case_003, which it saw
    assert fine_tune_report(os.path.join(folder, "checkpoint_final.pth"), fold=1)[
        "pretraining_cases_in_validation"] == ["case_000", "case_003"]


def test_missing_split_is_made_as_nnunets_trainer_makes_it(env):
    from nnssl.training.finetune import build_trainer

    folder = pretrain_once(env["tmp"], "f2", fold=2)
    with open(env["splits"], encoding="utf-8") as f:
        ours = json.load(f)
    os.remove(env["splits"])
    trainer = build_trainer(DS, "3d_fullres", 2, device="cpu").trainer
    trainer.initialize()
    _, val = trainer.do_split()  # nnU-Net writes its own splits_final.json
    with open(env["splits"], encoding="utf-8") as f:
        assert json.load(f) == ours
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cases = json.load(f)["pretraining_cases"]
    assert sorted(cases + list(val)) == TRAIN and not set(cases) & set(val)


def test_pool_pretraining_records_the_pools_cases_and_is_not_compared_by_name(env):
    folder = pretrain_once(env["tmp"], "pool", pretraining_data=POOL)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["pretraining_cases"] == ["u_000", "u_001"]
    write_splits(env["splits"])
    report = fine_tune_report(os.path.join(folder, "checkpoint_final.pth"), fold=0)
    assert report["pretraining_cases_in_validation"] is None
    assert report["pretraining_cases_check"].startswith("pretrained on Dataset002_Pool's images")


@pytest.mark.parametrize("kw, message", [
    (dict(fold=0, pretraining_data=POOL), "needs -pd intask"),
    (dict(fold=7), "has folds 0-1"),
])
def test_bad_folds_are_refused(env, kw, message):
    write_splits(env["splits"])
    with pytest.raises(NnsslError, match=message):
        pretrain_once(env["tmp"], "bad", **kw)
    assert not os.path.exists(env["tmp"] / "bad")
