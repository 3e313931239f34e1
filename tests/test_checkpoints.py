"""The pretraining checkpoint contract (nnssl/checkpoints.py): round trip, weights_only, refusals,
and compatibility with nnU-Net's own ``-pretrained_weights`` loader."""
import json
import os
from dataclasses import dataclass, field
from typing import Tuple

import numpy as np
import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnssl.checkpoints import (METADATA_KEYS, checkpoint_metadata, load_pretraining_checkpoint,
                               load_resume_checkpoint, restore_network, save_pretraining_checkpoint,
                               split_network_state, strip_prefixes, weights_sha256)
from nnssl.errors import NnsslError


@dataclass
class _Cfg:
    box: Tuple[int, int, int] = (8, 16, 16)
    lr: float = 1e-3
    count: int = field(default_factory=lambda: np.int64(4))  # numpy scalars must become Python ints


@pytest.fixture(scope="module")
def plans(pretrain_tree):
    folder = os.path.join(pretrain_tree["nnUNet_preprocessed"], pretrain_tree["dataset"])
    return PlansManager(os.path.join(folder, "nnUNetPlans.json"))


def build(pm, input_channels=1, classes=5, seed=0):
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(seed)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, input_channels, classes,
                                  allow_init=True, deep_supervision=False)


def metadata(pm, iteration=7):
    return checkpoint_metadata(architecture_name="plainconvunet", plans_manager=pm, configuration_name="3d_fullres",
                               input_channels=1, method_name="volume_fusion", method_config=_Cfg(),
                               transfer="encoder+decoder", pretraining_data="intask", dataset="Dataset001_Blobs",
                               iteration=iteration, seed=3)


@pytest.fixture
def saved(tmp_path, plans):
    net = build(plans)
    path = str(tmp_path / "checkpoint_final.pth")
    save_pretraining_checkpoint(path, net, metadata(plans), resume={"optimizer": {}, "method_state": {},
                                                                    "grad_scaler": {}, "loss_history": [],
                                                                    "schedule": {}})
    return path, net


def test_round_trip_is_weights_only_and_excludes_output_convs(saved, plans):
    path, net = saved
    ckpt = torch.load(path, weights_only=True)
    expected = {k: v for k, v in net.state_dict().items() if ".seg_layers." not in k}
    assert set(ckpt["network_weights"]) == set(expected)
    assert any(".seg_layers." in k for k in net.state_dict())  # the exclusion did something
    assert all(torch.equal(ckpt["network_weights"][k], v) for k, v in expected.items())
    cm = plans.get_configuration("3d_fullres")
    assert ckpt["nnssl_checkpoint_version"] == 1 and ckpt["iteration"] == 7 and ckpt["seed"] == 3
    assert ckpt["architecture"]["network_class_name"] == cm.network_arch_class_name
    assert ckpt["normalization"]["patch_size"] == list(cm.patch_size)
    assert ckpt["normalization"]["normalization_schemes"] == ["CTNormalization"]
    assert ckpt["method"]["config"] == {"box": [8, 16, 16], "lr": 1e-3, "count": 4}
    assert type(ckpt["method"]["config"]["count"]) is int
    with open(path[:-4] + ".json", encoding="utf-8") as f:
        assert json.load(f) == {k: ckpt[k] for k in METADATA_KEYS}
    loaded = load_pretraining_checkpoint(path, cm.network_arch_class_name, cm.network_arch_init_kwargs, 1)
    assert loaded["transfer"] == "encoder+decoder"


def test_resume_restores_the_whole_network(saved, plans):
    path, net = saved
    other = build(plans, seed=1)
    assert not torch.equal(other.decoder.seg_layers[0].weight, net.decoder.seg_layers[0].weight)
    restore_network(other, load_resume_checkpoint(path))
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_refuses_mismatching_network_listing_every_difference(saved, plans):
    path, _ = saved
    cm = plans.get_configuration("3d_fullres")
    kwargs = dict(cm.network_arch_init_kwargs)
    kwargs["features_per_stage"] = [f * 2 for f in kwargs["features_per_stage"]]
    kwargs["conv_bias"] = not kwargs["conv_bias"]
    with pytest.raises(NnsslError) as e:
        load_pretraining_checkpoint(path, "some.other.Network", kwargs, 2)
    msg = str(e.value)
    for part in ("architecture class", "some.other.Network", "features_per_stage", "conv_bias", "input channels",
                 path):
        assert part in msg
    with pytest.raises(NnsslError, match="input channels: checkpoint 1, expected 3"):
        load_pretraining_checkpoint(path, expected_input_channels=3)


def test_refuses_non_nnssl_unsafe_corrupted_and_missing_files(saved, tmp_path):
    path, net = saved
    plain = str(tmp_path / "plain.pth")
    torch.save({"state_dict": net.state_dict()}, plain)
    with pytest.raises(NnsslError, match="not an nnssl pretraining checkpoint"):
        load_pretraining_checkpoint(plain)
    unsafe = str(tmp_path / "unsafe.pth")
    torch.save({"nnssl_checkpoint_version": 1, "module": nn.Linear(2, 2)}, unsafe)  # pickled class instance
    with pytest.raises(NnsslError, match="weights_only=True"):
        load_pretraining_checkpoint(unsafe)
    truncated = str(tmp_path / "truncated.pth")
    with open(path, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[: os.path.getsize(path) // 2])
    with pytest.raises(NnsslError, match="corrupted"):
        load_pretraining_checkpoint(truncated)
    with pytest.raises(NnsslError, match="does not exist"):
        load_pretraining_checkpoint(str(tmp_path / "nope.pth"))


def test_resume_requires_complete_resume_state(saved, tmp_path):
    path, _ = saved
    ckpt = torch.load(path, weights_only=True)
    del ckpt["resume"]["optimizer"]
    broken = str(tmp_path / "checkpoint_latest.pth")
    torch.save(ckpt, broken)
    with pytest.raises(NnsslError, match="optimizer"):
        load_resume_checkpoint(broken)
    load_pretraining_checkpoint(broken)  # the contract part is still fine for fine-tuning


def test_nnunet_pretrained_weights_loader_accepts_the_checkpoint(saved, plans):
    """Stock `nnUNetv2_train -pretrained_weights` reads network_weights and needs every non-.seg_layers. key."""
    path, net = saved
    target = build(plans, classes=3, seed=5)
    seg_before = {k: v.clone() for k, v in target.state_dict().items() if ".seg_layers." in k}
    load_pretrained_weights(target, path)
    ckpt = torch.load(path, weights_only=True)
    for k, v in target.state_dict().items():
        if ".seg_layers." in k:
            assert torch.equal(v, seg_before[k])  # output convs keep their fresh initialization
        else:
            assert torch.equal(v, ckpt["network_weights"][k]), k
    assert any(k.startswith("encoder.") for k in ckpt["network_weights"])


def test_wrapper_prefixes_are_stripped(plans):
    assert strip_prefixes("module._orig_mod.encoder.stages.0.weight") == "encoder.stages.0.weight"
    assert strip_prefixes("encoder.module.weight") == "encoder.module.weight"  # only leading wrappers
    net = build(plans)
    wrapper = nn.Module()
    wrapper.module = net  # state dict keys 'module.encoder...' like DDP's
    a, b = split_network_state(wrapper), split_network_state(net)
    assert set(a[0]) == set(b[0]) and set(a[1]) == set(b[1])
    assert weights_sha256(a[0]) == weights_sha256(b[0])
    changed = dict(b[0])
    first = sorted(changed)[0]
    changed[first] = changed[first] + 1
    assert weights_sha256(changed) != weights_sha256(b[0])


def _facts(**normalization):
    norm = {"normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "foreground_intensity_properties_per_channel": {"0": {
                "mean": 50.0, "std": 20.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0, "max": 500.0}},
            "spacing": [3.0, 0.8, 0.8], "patch_size": [16, 32, 32], "transpose_forward": [0, 1, 2]}
    norm.update(normalization)
    return {"plans_name": "nnUNetPlans", "configuration": "3d_fullres", "data_identifier": "nnUNetPlans_3d_fullres",
            "normalization": norm}


def _stats(**changes):
    return {"0": {"mean": 50.0, "std": 20.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0, "max": 500.0,
                  **changes}}


def test_compare_plans_refuses_what_changes_the_input_and_reports_the_rest():
    from nnssl.checkpoints import compare_plans

    same = compare_plans(_facts(), _facts(spacing=[3.0 * (1 + 1e-9), 0.8, 0.8]))  # a float round trip
    assert same.refused == [] and same.harmless == []

    c = compare_plans(_facts(spacing=[2.0, 0.8, 0.8], transpose_forward=[2, 0, 1],
                             foreground_intensity_properties_per_channel=_stats(percentile_99_5=250.0, max=900.0)),
                      {**_facts(patch_size=[32, 32, 32]), "plans_name": "nnUNetResEncUNetMPlans"})
    assert c.refused == ["spacing: checkpoint [2.0, 0.8, 0.8], fine-tuning [3.0, 0.8, 0.8]",
                         "transpose_forward: checkpoint [2, 0, 1], fine-tuning [0, 1, 2]",
                         "channel 0 intensity percentile_99_5: checkpoint 250.0, fine-tuning 300.0"]
    assert c.harmless == ["channel 0 intensity max (not used by its normalization): checkpoint 900.0, fine-tuning 500.0",
                          "plans_name: checkpoint 'nnUNetPlans', fine-tuning 'nnUNetResEncUNetMPlans'",
                          "patch size: checkpoint [16, 32, 32], fine-tuning [32, 32, 32]"]

    # z-score normalizes each image by its own mean/std: the dataset statistics do not matter ...
    z = compare_plans(_facts(normalization_schemes=["ZScoreNormalization"],
                             foreground_intensity_properties_per_channel=_stats(mean=0.0)),
                      _facts(normalization_schemes=["ZScoreNormalization"]))
    assert z.refused == [] and len(z.harmless) == 1
    # ... but switching schemes (or the mask) does
    s = compare_plans(_facts(normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[True]), _facts())
    assert [line.split(":")[0] for line in s.refused] == ["normalization_schemes", "use_mask_for_norm"]
