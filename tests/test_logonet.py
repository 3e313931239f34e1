"""LoGoNet: 2x2x2 split/merge, branch wiring by hand, shapes, gradients, parameter counts; the
ULKANet/LoGoNet planners (divisibility, constraint error) and the fine-tuning trainer."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_raw_dataset
from nnssl.architectures.spec import count_parameters
from nnssl.architectures import ARCHITECTURES
from nnssl.architectures.blocks.lka import LargeKernelAttention3d
from nnssl.architectures.logonet import LoGoNet, LoGoNetConfig, merge_2x2x2, required_divisor, split_2x2x2
from nnssl.architectures.ulkanet import TINY, VARIANTS, ULKANet
from nnssl.errors import NnsslError
from nnssl.training.trainers.base import TRAINERS
from nnssl.training.trainers.logonet import EpochWarmupCosineLR, nnsslTrainer_LoGoNet, warmup_epochs_for

DS = "Dataset001_Blobs"


def test_split_merge_identity_and_cube_order():
    x = torch.randn(2, 3, 6, 8, 10)
    parts = split_2x2x2(x)
    assert len(parts) == 8 and all(p.shape == (2, 3, 3, 4, 5) for p in parts)
    assert torch.equal(merge_2x2x2(parts), x)
    assert torch.equal(parts[4 * 1 + 2 * 0 + 1], x[:, :, 3:, :4, 5:])  # second half along D and W
    labels = torch.arange(8.0).view(8, 1, 1, 1, 1, 1).expand(8, 1, 1, 2, 2, 2)
    merged = merge_2x2x2(list(labels))
    assert merged[0, 0, 3, 0, 2] == 4 + 0 + 1 and merged[0, 0, 0, 3, 1] == 0 + 2 + 0
    with pytest.raises(ValueError):
        merge_2x2x2(parts[:7])


def test_forward_is_global_plus_merged_local_then_fusion():
    torch.manual_seed(0)
    net = LoGoNet(1, 3, **TINY).eval()
    x = torch.randn(1, 1, 32, 32, 64)
    enc, dec = net.encoder, net.decoder
    with torch.no_grad():
        g = dec.global_decoder(enc.global_encoder(x))
        cubes = [x[:, :, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16, k * 32:(k + 1) * 32]
                 for i in range(2) for j in range(2) for k in range(2)]
        local = [dec.local_decoders[n](enc.local_encoders[n](c)) for n, c in enumerate(cubes)]
        fused = dec.fusion(g + merge_2x2x2(local))
        torch.testing.assert_close(net(x), dec.seg_layers[0](fused))
        torch.testing.assert_close(net.forward_features(x), fused)
    assert [len(e.stages) for e in enc.local_encoders] == [2] * 8 and len(enc.global_encoder.stages) == 4
    assert len({id(e) for e in enc.local_encoders}) == 8  # each cube has its own ULKANet


@pytest.mark.parametrize("patch", [(32, 32, 32), (64, 32, 96), (32, 64, 32)])
def test_output_shapes(patch):
    torch.manual_seed(0)
    net = LoGoNet(2, 4, **TINY).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 2, *patch))
    assert y.shape == (1, 4, *patch)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = LoGoNet(1, 3, **TINY).train()
    net(torch.randn(2, 1, 32, 32, 32)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing
    assert count_parameters(net) < 1_000_000


def test_interface_encoder_holds_both_branches():
    net = LoGoNet(1, 3, **TINY)
    names = {".".join(n.split(".")[:2]) for n, _ in net.named_parameters()}
    assert names == {"encoder.global_encoder", "encoder.local_encoders", "decoder.global_decoder",
                     "decoder.local_decoders", "decoder.fusion", "decoder.seg_layers"}
    assert count_parameters(net.encoder) + count_parameters(net.decoder) == count_parameters(net)
    assert len(net.decoder.seg_layers) == 1 and net.decoder.seg_layers[0].in_channels == 8


@pytest.mark.parametrize("variant,paper", [("normal", 67.5e6), ("large", 172.54e6)])
def test_default_parameter_counts_against_the_paper(variant, paper):
    net = LoGoNet(1, 14, **VARIANTS[variant])  # built, never run
    n = count_parameters(net)
    print(f"LoGoNet {variant} (1 channel, 14 classes): {n:,} parameters ({n / 1e6:.2f} M; paper {paper / 1e6} M)")
    # By structure: the global ULKANet without its classifier, 8 local 2-block ULKANets whose last
    # decoder block outputs the global width, the fusion conv (3^3, no bias) + BN, the classifier.
    cfg = LoGoNetConfig(**VARIANTS[variant])
    w = cfg.decoder_widths()[-1]
    ulka = ULKANet(1, 14, **VARIANTS[variant])
    local = ULKANet(1, 14, **{k: v[:2] for k, v in VARIANTS[variant].items()}, patch_kernels=(7, 3), strides=(4, 2),
                    decoder_dims=cfg.local_config().decoder_widths(final=w))
    expected = (count_parameters(ulka) - count_parameters(ulka.decoder.seg_layers)
                + 8 * (count_parameters(local) - count_parameters(local.decoder.seg_layers))
                + 27 * w * w + 2 * w + w * 14 + 14)
    assert n == expected
    assert abs(n / paper - 1) < 0.05  # assumed decoder widths: 2.6-2.9 % above Table 10


def test_feature_map_size_counts_every_conv_product_and_upsampled_map():
    patch = (32, 64, 32)
    net = LoGoNet(1, 3, **TINY).eval()
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel()))
             for m in net.modules() if isinstance(m, (nn.Conv3d, LargeKernelAttention3d, nn.Upsample))]
    with torch.no_grad():
        net(torch.randn(1, 1, *patch))
    for h in hooks:
        h.remove()
    assert net.compute_conv_feature_map_size(patch) == total[0]


def test_divisor_includes_the_split_and_bad_inputs_name_it():
    assert required_divisor(LoGoNetConfig()) == (32, 32, 32)
    # Strides 2, 2, 1, 1: the global needs multiples of 4, but each half must be a multiple of 4 too.
    cfg = {**TINY, "strides": (2, 2, 1, 1)}
    assert required_divisor(LoGoNetConfig(**cfg)) == (8, 8, 8)
    net = LoGoNet(1, 3, **cfg).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 8, 16, 24)).shape == (1, 3, 8, 16, 24)
    with pytest.raises(NnsslError, match=r"2x2x2 split.*\(8, 8, 8\)"):
        net(torch.randn(1, 1, 12, 16, 16))
    with pytest.raises(NnsslError, match="local_blocks"):
        LoGoNet(1, 3, **TINY, local_blocks=5)
    with pytest.raises(NnsslError, match="ending with the global decoder's width"):
        LoGoNet(1, 3, **TINY, local_decoder_dims=(4, 4, 4))


# --- planners ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned_tree(tmp_path_factory):
    """The blob dataset (24 x 40 x 40 voxels) planned and preprocessed once for ulkanet + logonet (--preset tiny)."""
    from nnssl.planning.api import plan_and_preprocess

    root = tmp_path_factory.mktemp("logonet_planning")
    env = {var: str(root / sub) for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                                                 ("nnUNet_results", "results"))}
    with pytest.MonkeyPatch.context() as mp:
        for var, folder in env.items():
            os.makedirs(folder)
            mp.setenv(var, folder)
        mp.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's VRAM estimate sets torch's threads to it
        write_raw_dataset(env["nnUNet_raw"])
        result = plan_and_preprocess(DS, architectures=["ulkanet", "logonet"], preset="tiny", num_processes=1,
                                     show_progress=False)
    return {**env, **result}


@pytest.fixture
def planned(planned_tree, tmp_path, monkeypatch):
    """nnU-Net's variables on the shared planned data, with a fresh results folder per test."""
    monkeypatch.setenv("nnUNet_raw", planned_tree["nnUNet_raw"])
    monkeypatch.setenv("nnUNet_preprocessed", planned_tree["nnUNet_preprocessed"])
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    return planned_tree


def test_planners_write_divisible_buildable_plans_and_the_trainer_builds_logonet(planned):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    for arch, cls in (("ulkanet", ULKANet), ("logonet", LoGoNet)):
        with open(planned["plans"][arch], encoding="utf-8") as f:
            plans = json.load(f)
        assert os.path.basename(planned["plans"][arch]) == ARCHITECTURES.get(arch).plans_name + ".json"
        cfg = plans["configurations"]["3d_fullres"]
        patch, a = cfg["patch_size"], cfg["architecture"]
        assert all(p % 32 == 0 and p > 0 for p in patch), patch
        assert a["arch_kwargs"]["dims"] == list(TINY["dims"]) and cfg["data_identifier"] == "nnUNetPlans_3d_fullres"
        net = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, 3,
                                     deep_supervision=False).eval()
        assert type(net) is cls
        with torch.no_grad():
            assert net(torch.zeros(1, 1, *patch)).shape == (1, 3, *patch)

    with open(planned["plans"]["logonet"], encoding="utf-8") as f:
        plans = json.load(f)
    with open(os.path.join(planned["nnUNet_preprocessed"], DS, "dataset.json"), encoding="utf-8") as f:
        dataset_json = json.load(f)
    trainer = nnsslTrainer_LoGoNet({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json,
                                   device=torch.device("cpu"))
    trainer.initialize()
    assert isinstance(trainer.network, LoGoNet) and trainer.network.decoder.deep_supervision is False
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["weight_decay"] == 1e-5 and trainer.optimizer.defaults["lr"] == 1e-4
    assert type(trainer.loss).__name__ == "DC_and_CE_loss" and trainer.loss.weight_ce == trainer.loss.weight_dice == 1


def test_large_planners_and_constraint_error(planned):
    from nnssl.planning.ulkanet import LoGoNetLargePlanner, LoGoNetPlanner

    large = LoGoNetLargePlanner(DS)
    kwargs = large.arch_kwargs((96, 96, 96), (1.0, 1.0, 1.0))
    assert kwargs["dims"] == [96, 192, 384, 768] and kwargs["depths"] == [3, 3, 24, 3]
    assert large.plans_identifier == "nnsslLoGoNetLargePlans" and large.patch_divisor((1.0,) * 3) == (32, 32, 32)
    # The blob images have 24 slices: a patch divisible by 64 along them would be mostly padding.
    planner = LoGoNetPlanner(DS, preset="tiny")
    planner.arch_overrides = {**TINY, "strides": (8, 2, 2, 2)}
    with pytest.raises(NnsslError, match=r"divisible by \(64, 64, 64\).*2x2x2.*local ULKANets' total stride"):
        planner.get_plans_for_configuration((3.0, 0.8, 0.8), (24, 40, 40), "x", 4 * 24 * 40 * 40, {})


# --- fine-tuning trainer -------------------------------------------------------------------
def test_warmup_cosine_schedule_values():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = EpochWarmupCosineLR(opt, 1e-4, num_epochs=1000, warmup_epochs=50)
    lrs = {}
    for epoch in (0, 24, 49, 50, 525, 999, 49):
        sched.step(epoch)
        lrs[epoch] = opt.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(1e-4 / 50) and lrs[24] == pytest.approx(1e-4 * 25 / 50)
    assert lrs[49] == pytest.approx(1e-4) and lrs[50] == pytest.approx(1e-4)
    assert lrs[525] == pytest.approx(0.5e-4)  # half-way through the cosine
    assert lrs[999] == pytest.approx(1e-4 * 0.5 * (1 + np.cos(np.pi * 949 / 950)))
    assert warmup_epochs_for(1000) == 50 and warmup_epochs_for(5) == 1


def test_trainer_is_registered_under_its_name():
    assert TRAINERS.get("nnsslTrainer_LoGoNet") is nnsslTrainer_LoGoNet
    for name in ("ulkanet", "ulkanet_large", "logonet", "logonet_large"):
        assert ARCHITECTURES.get(name).trainer == "nnsslTrainer_LoGoNet"
    fake = SimpleNamespace(network=nn.Linear(2, 2), initial_lr=1e-4, weight_decay=1e-5, num_epochs=100,
                           print_to_log_file=lambda *a: None)
    opt, sched = nnsslTrainer_LoGoNet.configure_optimizers(fake)
    assert opt.defaults["betas"] == (0.9, 0.999) and sched.schedule.warmup_iterations == 5
