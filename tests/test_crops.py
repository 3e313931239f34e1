"""A method's crop fits the plans by itself (nnssl/ssl/crops.py): the largest valid crop inside a planned patch that
is not a multiple of 32, for every (method, architecture) pair; refused only where none exists; printed and recorded."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

import nnssl.architectures  # noqa: F401
import nnssl.ssl  # noqa: F401
from nnssl.architectures.build import build_network
from nnssl.architectures.spec import ARCHITECTURES
from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS
from nnssl.ssl.crops import InputRule, largest_crop
from nnssl.training.pretrain_setup import network_input_rule, prepare
from nnssl.training.pretrainer import pretrain

SPACING = (1.0, 1.0, 1.0)
# A tiny stand-in for nnU-Net's 40 x 96 x 96 plans of a small CT set, per architecture family (every axis a
# multiple of the network's divisor, at least one axis not a multiple of 32 where the divisor allows it).
PLANNED = {"plainconvunet": (40, 80, 64), "resenc": (40, 80, 64), "pct_net": (48, 80, 64), "unetr": (48, 80, 64),
           "unetr_pp": (48, 96, 64)}
PLANNED_32 = (64, 96, 64)  # architectures whose divisor is 32: only the in-plane shape can be "wrong"
FIXED = {"unetr", "unetr_pp"}  # weights tied to the planned token count


def planned_patch(arch: str):
    return PLANNED.get(arch, PLANNED_32)


def expected_crop(method: str, arch: str):
    """Hand-derived: hybrid_mim keeps whole 32³ sub-volumes (40 -> 32, 80 -> 64; a region crop - 32 on the
    stride grid), swin_pretext a square rotation plane (80 or 96 -> 64) unless the network takes only its
    patch (refused: None); every other method takes the planned patch."""
    planned = planned_patch(arch)
    if method == "hybrid_mim":
        return {"plainconvunet": (32, 64, 64), "resenc": (32, 64, 64)}.get(arch, planned)
    if method == "swin_pretext":
        return None if arch in FIXED else (planned[0], 64, 64)
    return planned


def _rule(arch: str, patch):
    """network_input_rule on the plans' configuration the architecture's tiny planner writes for ``patch``."""
    spec = ARCHITECTURES.get(arch)
    block = spec.planner_class().without_dataset(1, 2, preset="tiny").network_for_patch(patch, SPACING)
    cm = ConfigurationManager({"patch_size": list(patch), "spacing": list(SPACING), "architecture": block})
    return network_input_rule(spec, SimpleNamespace(plans={"nnssl_preset": "tiny"}), cm, 1)


def test_largest_crop_search_by_hand():
    rule = InputRule((8, 16, 16), (8, 16, 16))
    assert rule.sizes(0, (40, 96, 96)) == [40, 32, 24, 16, 8]
    assert InputRule((40, 96, 96), (40, 96, 96), fixed=True).sizes(1, (40, 96, 96)) == [96]
    # the most voxels wins: (16, 32, 16) [8192 voxels] over (24, 16, 16) [6144], the first axis only breaks ties
    square = largest_crop((24, 32, 16), InputRule((8, 8, 8), (8, 8, 8)), lambda a, c: True,
                          lambda c: c[0] == c[2] or c[1] == c[2])
    assert square == (16, 32, 16)
    assert largest_crop((24, 32, 16), InputRule((8, 8, 8), (8, 8, 8)), lambda a, c: c != 16) == (24, 32, 8)
    assert largest_crop((24, 32, 16), InputRule((8, 8, 8), (16, 8, 8)), lambda a, c: c < 16 if a == 0 else True) \
        is None


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_method_picks_the_largest_valid_crop_of_a_plan_not_a_multiple_of_32(arch):
    """Every compatible method on every architecture: the hand-derived crop; the network runs on it, and
    the methods that check crops against the network at start-up (configure) accept it."""
    planned = planned_patch(arch)
    rule = _rule(arch, planned)
    assert rule.fixed == (arch in FIXED)
    build = lambda channels=1: build_network(arch, planned, 1, channels, preset="tiny")  # noqa: E731
    network = build().eval()
    crops = set()
    for method in METHODS.names():
        cls = METHODS.get(method)
        if not cls.requires <= ARCHITECTURES.get(arch).capabilities:
            continue
        want = expected_crop(method, arch)
        if want is None:
            with pytest.raises(NnsslError, match=r"No crop inside the planned patch .*takes only its planned patch"):
                cls.choose_crop(cls.default_config(arch), planned, rule)
            continue
        choice = cls.choose_crop(cls.default_config(arch), planned, rule)
        assert choice.crop == want, method
        assert choice.planned == planned and bool(choice.reason) == (want != planned)
        if method in ("hybrid_mim", "order_reconstruction"):  # the run's own start-up checks on the network
            cls.configure(cls.default_config(arch), build, choice.crop, 1)
        crops.add(choice.crop)
    for crop in crops:
        with torch.no_grad():
            out = network(torch.zeros(1, 1, *crop))
        assert tuple(out.shape[2:]) == crop


def test_hybrid_mim_run_on_plans_of_40_x_48_x_48_prints_and_records_its_crop(pretrain_env, tmp_path, monkeypatch,
                                                                             capsys):
    """Formerly refused ("not divisible into whole sub-volumes of 32³ ... set --set crop_size"): the run takes
    32³ (40 -> 32, 48 -> 32), says why at its start and records it in config.json."""
    pre = tmp_path / "preprocessed"
    shutil.copytree(os.path.join(pretrain_env["nnUNet_preprocessed"], pretrain_env["dataset"]),
                    pre / pretrain_env["dataset"])
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    plans_file = pre / pretrain_env["dataset"] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["patch_size"] = [40, 48, 48]
    plans_file.write_text(json.dumps(plans))
    assert prepare(pretrain_env["dataset"], "hybrid_mim").crop_size == (32, 32, 32)
    out = pretrain(pretrain_env["dataset"], "hybrid_mim", iterations=1, iterations_per_epoch=1, batch_size=2,
                   device="cpu", num_workers=0)
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert (config["crop_size"], config["planned_patch_size"]) == ([32, 32, 32], [40, 48, 48])
    assert "32x32x32 sub-volumes" in config["crop_reason"]
    line = "Crop [32, 32, 32]: the largest valid crop inside the planned patch [40, 48, 48], because hybrid_mim"
    assert line in open(os.path.join(out, "training_log.txt")).read()
    assert line in capsys.readouterr().err  # the console log
