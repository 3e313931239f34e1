"""UNETR: parameter count by formula and against the paper, MONAI parity (keys and outputs), encoder
levels, the fixed patch, the residual conv block by hand, planner and fine-tuning trainer."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import require_optional

from nnssl.architectures import ARCHITECTURES, build_network
from nnssl.architectures.blocks.res_conv import ResConvBlock
from nnssl.architectures.monai_keys import from_monai, to_monai
from nnssl.architectures.spec import count_parameters
from nnssl.architectures.unetr import MONAI_DROP, MONAI_KEYS, TINY, UNETR, UNETRConfig, load_monai_state_dict
from nnssl.errors import NnsslError
from nnssl.training.trainers.unetr import FixedPatchMixin

DS = "Dataset001_Blobs"


def res_block(c_in, c_out):
    return 27 * (c_in * c_out + c_out * c_out) + (c_in * c_out if c_in != c_out else 0)  # bias-free, no-affine norms


def unetr_parameters(c_in, n_cls, img, fs=16, h=768, mlp=3072, layers=12):
    n_tokens = (img[0] // 16) * (img[1] // 16) * (img[2] // 16)
    vit = c_in * h * 16 ** 3 + h + n_tokens * h
    vit += layers * (4 * h + 3 * h * h + h * h + h + h * mlp + mlp + mlp * h + h) + 2 * h
    deconv = lambda a, b: 8 * a * b  # noqa: E731  (kernel 2^3, no bias)
    proj = (deconv(h, 2 * fs) + 2 * (deconv(2 * fs, 2 * fs) + res_block(2 * fs, 2 * fs))
            + deconv(h, 4 * fs) + deconv(4 * fs, 4 * fs) + res_block(4 * fs, 4 * fs) + deconv(h, 8 * fs))
    ups = sum(deconv(a, b) + res_block(2 * b, b) for a, b in ((h, 8 * fs), (8 * fs, 4 * fs), (4 * fs, 2 * fs),
                                                               (2 * fs, fs)))
    return vit + res_block(c_in, fs) + proj + ups + fs * n_cls + n_cls


def test_parameter_count_by_formula_and_against_the_paper():
    net = build_network("unetr", (96, 96, 96), 1, 14)  # built, never run
    n = count_parameters(net)
    print(f"UNETR at 96^3 (1 channel, 14 classes): {n:,} parameters ({n / 1e6:.2f} M; paper 92.8 M)")
    assert n == unetr_parameters(1, 14, (96, 96, 96))
    assert abs(n / 92.8e6 - 1) < 0.03
    assert count_parameters(UNETR(2, 3, img_size=(32, 48, 64), **TINY)) == unetr_parameters(
        2, 3, (32, 48, 64), TINY["feature_size"], TINY["hidden_size"], TINY["mlp_dim"], TINY["num_layers"])


def test_monai_state_dict_loads_strictly_and_outputs_match():
    monai_nets = require_optional("monai.networks.nets", min_version="1.3")  # MONAI's UNETR with proj_feat
    kwargs = dict(img_size=(32, 48, 32), feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2)
    torch.manual_seed(0)
    ref = monai_nets.UNETR(2, 3, **kwargs).eval()
    ours = UNETR(2, 3, **kwargs).eval()
    load_monai_state_dict(ours, ref.state_dict())  # strict
    x = torch.randn(2, 2, 32, 48, 32)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
        # levels: MONAI's hidden states 3, 6, 9 (after blocks 4, 7, 10) and the normalised last one
        last, hidden = ref.vit(x)
        levels = ours.encoder(x)
        for level, z in zip(levels[1:], (hidden[3], hidden[6], hidden[9], last)):
            torch.testing.assert_close(level, ref.proj_feat(z))
        torch.testing.assert_close(levels[0], ref.encoder1(x))
    # back to MONAI: every key but the unused cross-attention norms, same values
    missing, unexpected = ref.load_state_dict(to_monai(ours.state_dict(), MONAI_KEYS), strict=False)
    assert not unexpected and missing and all("norm_cross_attn" in k for k in missing)
    assert set(from_monai(ref.state_dict(), MONAI_KEYS, MONAI_DROP)) == set(ours.state_dict())
    with pytest.raises(KeyError, match="matches none"):
        to_monai({"head.weight": torch.zeros(1)}, MONAI_KEYS)


def test_key_names_follow_the_network_contract():
    net = UNETR(1, 3, img_size=(32, 32, 32), **TINY)
    keys = list(net.state_dict())
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert [k for k in keys if ".seg_layers." in k] == ["decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"]
    assert "encoder.vit.patch_embedding.position_embeddings" in keys
    assert "decoder.encoder2.transp_conv_init.conv.weight" in keys


def test_encoder_levels_forward_wiring_and_deep_supervision_flag():
    torch.manual_seed(0)
    net = UNETR(1, 3, img_size=(32, 64, 48), **TINY).eval()
    x = torch.randn(1, 1, 32, 64, 48)
    with torch.no_grad():
        levels = net.encoder(x)
        assert [tuple(t.shape) for t in levels] == [(1, 4, 32, 64, 48)] + [(1, 32, 2, 4, 3)] * 4
        d = net.decoder
        y = d.decoder5(levels[4], d.encoder4(levels[3]))
        y = d.decoder4(y, d.encoder3(levels[2]))
        y = d.decoder3(y, d.encoder2(levels[1]))
        y = d.seg_layers[0](d.decoder2(y, levels[0]))
        out = net(x)
        torch.testing.assert_close(out, y)
        net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
        ds = net(x)
    assert out.shape == (1, 3, 32, 64, 48) and isinstance(ds, list) and len(ds) == 1 and torch.equal(ds[0], out)
    # level 1 = block 0's tokens reshaped: token (d, h, w) in raster order sits at [d, h, w]
    tokens = net.encoder.vit.blocks[0](net.encoder.vit.patch_embedding(x))
    assert torch.equal(levels[1][0, :, 1, 2, 0], tokens[0, 1 * 4 * 3 + 2 * 3 + 0])


def test_patch_not_divisible_by_16_and_other_patch_are_refused():
    net = UNETR(1, 2, img_size=(32, 32, 32), **TINY)
    with pytest.raises(NnsslError, match=r"not divisible by \(16, 16, 16\).*32 or 48"):
        net(torch.zeros(1, 1, 40, 32, 32))
    with pytest.raises(NnsslError, match=r"planned for patches of \(32, 32, 32\) and got \(48, 32, 32\).*position"):
        net.encoder(torch.zeros(1, 1, 48, 32, 32))
    with pytest.raises(NnsslError, match="multiples of the ViT patch 16"):
        UNETRConfig(img_size=(40, 32, 32))
    with pytest.raises(NnsslError, match="skip_blocks"):
        UNETRConfig(num_layers=3, skip_blocks=(0, 1, 3))
    with pytest.raises(NnsslError, match=r"Patch \[40, 32, 32\] does not fit UNETRPlanner.*by \(16, 16, 16\)"):
        build_network("unetr", (40, 32, 32), 1, 2, preset="tiny")


def test_residual_block_by_hand():
    torch.manual_seed(0)
    block = ResConvBlock(3, 3)
    x = torch.randn(2, 3, 4, 5, 6)
    lrelu = lambda t: F.leaky_relu(t, 0.01)  # noqa: E731
    y = lrelu(F.instance_norm(F.conv3d(x, block.conv1.conv.weight, padding=1)))
    y = lrelu(F.instance_norm(F.conv3d(y, block.conv2.conv.weight, padding=1)) + x)  # identity skip (3 -> 3)
    torch.testing.assert_close(block(x), y)
    wide = ResConvBlock(2, 3)
    x = torch.randn(1, 2, 4, 4, 4)
    z = lrelu(F.instance_norm(F.conv3d(x, wide.conv1.conv.weight, padding=1)))
    z = F.instance_norm(F.conv3d(z, wide.conv2.conv.weight, padding=1))
    torch.testing.assert_close(wide(x), lrelu(z + F.instance_norm(F.conv3d(x, wide.conv3.conv.weight))))


def test_memory_estimate_counts_attention_and_fits_the_default_budget():
    net = build_network("unetr", (96, 96, 96), 1, 14)
    estimate = net.compute_conv_feature_map_size((96, 96, 96))
    n, h = 216, 768
    vit = 2 * n * h + 12 * (n * (7 * h + 3072) + 12 * n * n)
    assert net.encoder.compute_conv_feature_map_size((96, 96, 96)) == vit + 3 * 16 * 96 ** 3
    assert estimate < 560e6  # nnU-Net's reference for 8 GB: the paper's 96^3 is planned unchanged


def test_planner_records_the_patch_and_the_trainer_builds_unetr(pretrain_env):
    """On the session's shared tree (conftest.pretrain_tree: every architecture planned, --preset tiny)."""
    from nnssl.training.trainers.unetr import nnsslTrainer_UNETR

    folder = os.path.join(pretrain_env["nnUNet_preprocessed"], DS)
    with open(os.path.join(folder, ARCHITECTURES.get("unetr").plans_name + ".json"), encoding="utf-8") as f:
        plans = json.load(f)
    cfg = plans["configurations"]["3d_fullres"]
    assert all(p % 16 == 0 and p >= 32 for p in cfg["patch_size"])  # tiny preset: at least 32 per axis
    assert cfg["architecture"]["arch_kwargs"]["img_size"] == cfg["patch_size"]
    assert cfg["architecture"]["arch_kwargs"]["hidden_size"] == TINY["hidden_size"]
    with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as f:
        dataset_json = json.load(f)
    trainer = nnsslTrainer_UNETR({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json,
                                 device=torch.device("cpu"))
    trainer.initialize()
    assert isinstance(trainer.network, UNETR) and trainer.network.decoder.deep_supervision is False
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["weight_decay"] == 1e-5 and trainer.optimizer.defaults["lr"] == 1e-4
    assert type(trainer.loss).__name__ == "DC_and_CE_loss"
    assert ARCHITECTURES.get("unetr").trainer == "nnsslTrainer_UNETR"


def test_trainer_refuses_a_patch_other_than_the_planned_one():
    class Base:
        def initialize(self):
            self.initialized = True

    class Trainer(FixedPatchMixin, Base):
        pass

    t = Trainer()
    t.configuration_manager = SimpleNamespace(patch_size=[64, 64, 64], network_arch_init_kwargs={"img_size": [96] * 3})
    with pytest.raises(NnsslError, match=r"patch_size \[64, 64, 64\] differs.*img_size \[96, 96, 96\]"):
        t.initialize()
    t.configuration_manager.patch_size = (96, 96, 96)
    t.initialize()
    assert t.initialized
