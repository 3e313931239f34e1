"""Shared by the foreign-format tests: plan a tiny labeled dataset --like a pretrained file and
fine-tune 2 iterations from it through the commands (nnssl_plan_and_preprocess, nnssl_train)."""
import json
import os

import pytest

from conftest import write_raw_dataset


def run_main(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, argv


def finetune_like(env: dict, pretrained: str) -> dict:
    """``--like pretrained`` then ``nnssl_train ... -pretrained pretrained`` (1 epoch of 2 iterations);
    returns ``nnssl_pretrained.json`` (the injection report) of the fold."""
    from nnssl.cli.plan_and_preprocess import main as plan_main
    from nnssl.cli.train import main as train_main

    write_raw_dataset(env["nnUNet_raw"], n_train=2, n_test=0, shape=(16, 24, 24), spacing=(1.0, 1.0, 1.0))
    run_main(plan_main, ["-d", "Blobs", "--like", pretrained, "-np", "1", "--no_pbar"])
    folder = os.path.join(env["nnUNet_preprocessed"], "Dataset001_Blobs")
    plans = [f[:-5] for f in os.listdir(folder) if f.startswith("nnsslLike_") and f.count(".") == 1 and f.endswith(".json")]
    assert len(plans) == 1, plans
    run_main(train_main, ["Blobs", "3d_fullres", "all", "-p", plans[0], "-pretrained", pretrained, "--epochs", "1",
                          "--iterations_per_epoch", "2", "--val_iterations", "1", "-device", "cpu"])
    results = os.path.join(env["nnUNet_results"], "Dataset001_Blobs")
    [trainer_dir] = os.listdir(results)
    with open(os.path.join(results, trainer_dir, "fold_all", "nnssl_pretrained.json"), encoding="utf-8") as f:
        return json.load(f)
