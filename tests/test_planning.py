"""Planning: nnssl's planners against nnU-Net's own, and the generic nnssl architecture planner."""
import filecmp
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from conftest import write_raw_dataset
from nnssl.errors import NnsslError
from nnssl.planning import api
from nnssl.planning.planners import nnsslArchitecturePlanner, nnsslPlainConvUNetPlanner

DS = "Dataset001_Blobs"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One tiny dataset preprocessed by nnU-Net (subprocess) and by nnssl (-a plainconvunet resenc).

    (nnU-Net's planner fails with conftest's nnUNet_n_proc_DA=0; nnssl's planners cope with it.)

    Returns (raw root, nnU-Net's preprocessed root, nnssl's preprocessed root, #labeled preprocessing runs).
    """
    root = tmp_path_factory.mktemp("planning")
    raw, ref, ours = (str(root / d) for d in ("raw", "pp_nnunet", "pp_nnssl"))
    write_raw_dataset(raw)
    env = {**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_raw": raw, "nnUNet_preprocessed": ref,
           "nnUNet_results": str(root / "res")}
    r = subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "1", "-c", "3d_fullres", "-np", "1"], env=env,
                       capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    calls = []

    def counting_preprocess_labeled(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    real = api.preprocess_labeled
    with pytest.MonkeyPatch.context() as mp:
        for var, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", ours), ("nnUNet_results", str(root / "res"))):
            mp.setenv(var, value)
        mp.setattr(api, "preprocess_labeled", counting_preprocess_labeled)
        api.plan_and_preprocess("Blobs", architectures=["plainconvunet", "resenc"], num_processes=1,
                                show_progress=False)
    return raw, ref, ours, len(calls)


def load_plans(pp_root, name):
    with open(os.path.join(pp_root, DS, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def test_plainconvunet_plans_equal_nnunets(planned):
    _, ref, ours, _ = planned
    a, b = load_plans(ref, "nnUNetPlans"), load_plans(ours, "nnUNetPlans")
    ca, cb = a["configurations"]["3d_fullres"], b["configurations"]["3d_fullres"]
    assert cb["spacing"] == ca["spacing"]
    assert b["foreground_intensity_properties_per_channel"] == a["foreground_intensity_properties_per_channel"]
    assert cb["patch_size"] == ca["patch_size"] and cb["architecture"] == ca["architecture"]
    assert b["experiment_planner_used"] == "nnsslPlainConvUNetPlanner"
    assert "nnssl_preset" not in b  # without a preset nothing nnssl-specific is added
    assert {k: v for k, v in a.items() if k != "experiment_planner_used"} == \
           {k: v for k, v in b.items() if k != "experiment_planner_used"}


def test_plainconvunet_data_identical_to_nnunets(planned):
    raw, ref, ours, _ = planned
    folder = "nnUNetPlans_3d_fullres"
    da = nnUNetDatasetBlosc2(os.path.join(ref, DS, folder))
    db = nnUNetDatasetBlosc2(os.path.join(ours, DS, folder))
    assert da.identifiers == db.identifiers == [f"case_{i:03d}" for i in range(4)]
    for i in da.identifiers:
        data_a, seg_a, _, props_a = da.load_case(i)
        data_b, seg_b, _, props_b = db.load_case(i)
        assert np.array_equal(data_a[:], data_b[:]) and np.array_equal(seg_a[:], seg_b[:])
        assert props_a["bbox_used_for_cropping"] == props_b["bbox_used_for_cropping"]
    # labels copied for validation, dataset.json copied beside the plans
    gt = sorted(os.listdir(os.path.join(ours, DS, "gt_segmentations")))
    assert gt == sorted(os.listdir(os.path.join(ref, DS, "gt_segmentations")))
    assert all(filecmp.cmp(os.path.join(ours, DS, "gt_segmentations", f), os.path.join(raw, DS, "labelsTr", f),
                           shallow=False) for f in gt)
    assert filecmp.cmp(os.path.join(ours, DS, "dataset.json"), os.path.join(raw, DS, "dataset.json"), shallow=False)


def test_architectures_share_one_data_folder(planned):
    _, _, ours, n_labeled_runs = planned
    plain, resenc = load_plans(ours, "nnUNetPlans"), load_plans(ours, "nnUNetResEncUNetMPlans")
    assert resenc["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    ids = {p["configurations"]["3d_fullres"]["data_identifier"] for p in (plain, resenc)}
    assert ids == {"nnUNetPlans_3d_fullres"}
    assert n_labeled_runs == 1
    folders = [d for d in os.listdir(os.path.join(ours, DS)) if os.path.isdir(os.path.join(ours, DS, d))]
    assert sorted(folders) == ["gt_segmentations", "nnUNetPlans_3d_fullres"]


@pytest.fixture
def fingerprinted(planned, tmp_path, monkeypatch):
    """A fresh preprocessed root holding only the dataset's fingerprint and dataset.json (no plans)."""
    raw, _, ours, _ = planned
    pp = tmp_path / "pp"
    os.makedirs(pp / DS)
    for f in ("dataset_fingerprint.json", "dataset.json"):
        shutil.copy(os.path.join(ours, DS, f), pp / DS / f)
    for var, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", str(pp)), ("nnUNet_results", str(tmp_path))):
        monkeypatch.setenv(var, value)
    return str(pp)


def test_preset_tiny_is_applied_and_recorded(fingerprinted):
    api.plan_and_preprocess(DS, architectures=["plainconvunet", "resenc"], no_pp=True, preset="tiny",
                            show_progress=False)
    for name in ("nnUNetPlans", "nnUNetResEncUNetMPlans"):
        plans = load_plans(fingerprinted, name)
        assert plans["nnssl_preset"] == "tiny"
        features = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]
        assert features[0] == 8 and max(features) <= 64
    assert not os.path.exists(os.path.join(fingerprinted, DS, "nnUNetPlans_3d_fullres"))  # --no_pp


# --------------------------------------------------------------------------- the generic nnssl planner


class TinyNet(nn.Module):
    """Two-level conv net with the nnssl network contract; x: [B, C, X, Y, Z] -> [B, num_classes, X, Y, Z]."""

    def __init__(self, input_channels, num_classes, features=4, deep_supervision=False):
        super().__init__()
        self.features = features
        self.encoder = nn.Sequential(nn.Conv3d(input_channels, features, 3, padding=1),
                                     nn.Conv3d(features, 2 * features, 3, stride=2, padding=1))
        self.decoder = nn.Module()
        self.decoder.deep_supervision = deep_supervision
        self.decoder.up = nn.ConvTranspose3d(2 * features, features, 2, stride=2)
        self.decoder.seg_layers = nn.ModuleList([nn.Conv3d(features, num_classes, 1)])

    def forward(self, x):
        return self.decoder.seg_layers[0](self.decoder.up(self.encoder(x)))

    def compute_conv_feature_map_size(self, patch_size):
        """Elements of all feature maps: F at full resolution, 2F at half (exact for this net's shapes)."""
        n = int(np.prod(patch_size))
        return self.features * n + 2 * self.features * n // 8 + self.features * n


class TinyPlanner(nnsslArchitecturePlanner):
    network_class_name = f"{__name__}.TinyNet"
    presets = {"tiny": {"base_features": 2}}
    base_features = 4
    divisor = (8, 16, 16)

    def arch_kwargs(self, patch_size, spacing):
        return {"features": self.base_features}

    def patch_divisor(self, spacing):
        return self.divisor


def tiny_estimate(patch, features=4):
    return TinyNet(1, 3, features).compute_conv_feature_map_size(patch)


def budget_gb(elements, planner):
    """The -gpu_memory_target (GB) whose feature-map budget is ``elements``."""
    return elements / planner.UNet_reference_val_3d * planner.UNet_reference_val_corresp_GB


SPACING, MEDIAN, N_VOX = (3.0, 0.8, 0.8), (24, 40, 40), 4 * 24 * 40 * 40


def test_nnssl_planner_rounds_nnunets_patch_to_the_divisor(fingerprinted):
    planner = TinyPlanner(DS)
    plan = planner.get_plans_for_configuration(SPACING, MEDIAN, "x", N_VOX, {})
    # nnU-Net's own patch for this median shape is the whole image (24, 40, 40); rounded to (8, 16, 16)
    assert tuple(plan["patch_size"]) == (24, 32, 32)
    assert all(p % d == 0 for p, d in zip(plan["patch_size"], TinyPlanner.divisor))
    assert plan["architecture"] == {"network_class_name": TinyPlanner.network_class_name,
                                    "arch_kwargs": {"features": 4}, "_kw_requires_import": ()}
    assert plan["normalization_schemes"] == ["CTNormalization"]  # inherited from nnU-Net


def test_nnssl_planner_budgets_its_own_network_not_nnunets(fingerprinted):
    # On large images nnU-Net shrinks its patch for PlainConvUNet's memory; TinyNet is far lighter,
    # so nnssl's planner keeps nnU-Net's initial patch (the median shape here).
    median = (64, 256, 256)
    ours = TinyPlanner(DS).get_plans_for_configuration(SPACING, median, "x", 1e9, {})
    nnunet = nnsslPlainConvUNetPlanner(DS).get_plans_for_configuration(SPACING, median, "x", 1e9, {})
    assert tuple(ours["patch_size"]) == median
    assert np.prod(nnunet["patch_size"]) < np.prod(median)


def test_nnssl_planner_shrinks_the_patch_to_the_budget(fingerprinted):
    # Budget between (16, 16, 32) and (16, 32, 32): from (24, 32, 32) the axis largest relative to the
    # median (24, 40, 40) shrinks first: z 24 -> 16 (ratios 1, .8, .8), then y 32 -> 16 (first of the ties).
    budget = (tiny_estimate((16, 16, 32)) + tiny_estimate((16, 32, 32))) / 2
    planner = TinyPlanner(DS, gpu_memory_target_in_gb=budget_gb(budget, TinyPlanner(DS)))
    plan = planner.get_plans_for_configuration(SPACING, MEDIAN, "x", N_VOX, {})
    assert tuple(plan["patch_size"]) == (16, 16, 32)
    assert tiny_estimate(plan["patch_size"]) <= budget
    # batch: round(budget / estimate * 2) = 3, but 5% of the dataset is < 1 patch -> the minimum, 2
    assert plan["batch_size"] == 2


@pytest.mark.parametrize("factor,expected", [(10, 20), (3.3, 7), (1.2, 2)])
def test_nnssl_planner_batch_size_grows_with_a_large_budget(fingerprinted, factor, expected):
    """Memory-based batch size: round(budget / estimate x nnU-Net's reference batch 2), on a dataset so
    large (1e12 voxels) that the 5%-of-dataset cap (~2e9 patches) never binds."""
    planner = TinyPlanner(DS)
    planner.UNet_vram_target_GB = budget_gb(factor * tiny_estimate((24, 32, 32)), planner)
    plan = planner.get_plans_for_configuration(SPACING, MEDIAN, "x", 1e12, {})
    assert tuple(plan["patch_size"]) == (24, 32, 32)
    assert plan["batch_size"] == expected  # round(10 x 2), round(6.6), round(2.4)


def test_nnssl_planner_writes_shared_data_identifier_and_buildable_plans(fingerprinted):
    planner = TinyPlanner(DS, preset="tiny")
    planner.plan_experiment()
    plans = load_plans(fingerprinted, "TinyPlans")  # default plans name from the class name
    assert plans["nnssl_preset"] == "tiny"
    assert "2d" not in plans["configurations"]  # 3D-only networks
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert cfg["architecture"]["arch_kwargs"] == {"features": 2}
    net = get_network_from_plans(cfg["architecture"]["network_class_name"], cfg["architecture"]["arch_kwargs"],
                                 cfg["architecture"]["_kw_requires_import"], 1, 3)
    out = net(torch.zeros(1, 1, *cfg["patch_size"]))
    assert out.shape == (1, 3, *cfg["patch_size"])


def test_nnssl_planner_errors_name_the_constraint(fingerprinted):
    planner = TinyPlanner(DS)
    planner.divisor = (64, 16, 16)  # 64 > 2 x 24 slices
    with pytest.raises(NnsslError, match=r"divisible by \(64, 16, 16\)"):
        planner.get_plans_for_configuration(SPACING, MEDIAN, "x", N_VOX, {})
    starved = TinyPlanner(DS, gpu_memory_target_in_gb=budget_gb(tiny_estimate((8, 16, 16)) / 2, TinyPlanner(DS)))
    with pytest.raises(NnsslError, match="-gpu_memory_target"):
        starved.get_plans_for_configuration(SPACING, MEDIAN, "x", N_VOX, {})
    with pytest.raises(NnsslError, match="no preset 'huge'.*tiny"):
        TinyPlanner(DS, preset="huge")
