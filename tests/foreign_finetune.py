"""Shared by the checkpoint tests: a native checkpoint dict; plan a tiny labeled dataset --like a
pretrained file and fine-tune 2 iterations from it through the commands (nnssl_plan_and_preprocess,
nssl_train)."""
import json
import os

import pytest

from conftest import write_raw_dataset


def run_main(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, argv


def finetune_like(env: dict, pretrained: str, shape=(16, 24, 24), spacing=(1.0, 1.0, 1.0), cli=True) -> dict:
    """``--like pretrained`` then ``nnssl_train ... -pretrained pretrained`` (1 epoch of 2 iterations) on
    2 images of ``shape`` at ``spacing``; returns ``nnssl_pretrained.json`` (the injection report)."""
    from nnssl.cli.plan_and_preprocess import main as plan_main
    from nnssl.cli.train import main as train_main
    from nnssl.training.finetune import train

    write_raw_dataset(env["nnUNet_raw"], n_train=2, n_test=0, shape=shape, spacing=spacing)
    run_main(plan_main, ["-d", "Blobs", "--like", pretrained, "-np", "1", "--no_pbar"])
    folder = os.path.join(env["nnUNet_preprocessed"], "Dataset001_Blobs")
    plans = [f[:-5] for f in os.listdir(folder) if f.startswith("nnsslLike_") and f.count(".") == 1 and f.endswith(".json")]
    assert len(plans) == 1, plans
    if cli:
        run_main(train_main, ["Blobs", "3d_fullres", "all", "-p", plans[0], "-pretrained", pretrained, "--epochs",
                              "1", "--iterations_per_epoch", "2", "--val_iterations", "1", "-device", "cpu"])
    else:  # what nnssl_train calls, without the final sliding-window validation (slow for large patches)
        train("Blobs", "3d_fullres", "all", plans=plans[0], pretrained=pretrained, epochs=1, iterations_per_epoch=2,
              val_iterations=1, device="cpu", final_validation=False)
    results = os.path.join(env["nnUNet_results"], "Dataset001_Blobs")
    [trainer_dir] = os.listdir(results)
    with open(os.path.join(results, trainer_dir, "fold_all", "nnssl_pretrained.json"), encoding="utf-8") as f:
        return json.load(f)


def native_checkpoint(arch="plainconvunet", dataset="Dataset001_Blobs", plans_name="nnUNetPlans"):
    """A complete contract dict of nnssl_pretrain for a tiny ``arch`` (weights as initialized)."""
    from nnssl.architectures import build_network
    from nnssl.architectures.spec import ARCHITECTURES

    planner = ARCHITECTURES.get(arch).planner_class().without_dataset(1, 2, preset="tiny")
    block = planner.network_for_patch((16, 16, 16))
    net = build_network(arch, (16, 16, 16), 1, 2, preset="tiny")
    weights = {k: v for k, v in net.state_dict().items() if ".seg_layers." not in k}
    return {"nnssl_checkpoint_version": 1, "architecture": {"name": arch, **block},
            "plans_name": plans_name, "configuration": "3d_fullres", "data_identifier": "nnUNetPlans_3d_fullres",
            "normalization": {"normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                              "foreground_intensity_properties_per_channel": {}, "spacing": [1.0, 1.0, 1.0],
                              "patch_size": [16, 16, 16], "transpose_forward": [0, 1, 2]},
            "input_channels": 1, "method": {"name": "volume_fusion", "config": {}}, "pretraining_data": "intask",
            "dataset": dataset, "iteration": 2, "transfer": "encoder", "seed": 0, "network_weights": weights}
