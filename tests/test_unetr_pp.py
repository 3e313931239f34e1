"""UNETR++: efficient paired attention by hand, the transformer block and the forward wiring
recomputed from submodules, parameter count by formula and against the paper, the fixed patch,
planner and the deep-supervised SGD trainer."""
import json
import os

import pytest
import torch

from nnssl.architectures import ARCHITECTURES, build_network
from nnssl.architectures.blocks.epa import EfficientPairedAttention, EPABlock
from nnssl.architectures.spec import count_parameters
from nnssl.architectures.unetr_pp import TINY, UNETRpp, UNETRppConfig, deep_supervision_scales
from nnssl.errors import NnsslError

DS = "Dataset001_Blobs"


def test_paired_attention_by_hand():
    """Per head: channel attention softmax over the head's channels of normalised q, k (with its
    temperature); spatial attention over the P projected tokens; branches to C/2 each, spatial first."""
    torch.manual_seed(0)
    n, c, p, heads = 6, 8, 3, 2
    epa = EfficientPairedAttention(n, c, p, heads).eval()
    with torch.no_grad():
        epa.temperature_channel.copy_(torch.tensor([0.5, 2.0]).view(2, 1, 1))
        epa.temperature_spatial.copy_(torch.tensor([3.0, 0.25]).view(2, 1, 1))
    x = torch.randn(1, n, c)
    out = epa.qkvv(x)[0]  # [N, 4C]: q | k | v_channel | v_spatial, each head-major
    d = c // heads
    x_c, x_s = torch.zeros(n, c), torch.zeros(n, c)
    for j in range(heads):
        cols = slice(j * d, (j + 1) * d)
        q, k, vc, vs = (out[:, i * c:(i + 1) * c][:, cols] for i in range(4))  # each [N, d]
        qn, kn = q / q.norm(dim=0, keepdim=True), k / k.norm(dim=0, keepdim=True)  # unit columns over tokens
        a_c = torch.softmax(qn.T @ kn * epa.temperature_channel[j, 0, 0], dim=1)  # [d, d], rows over channels
        assert torch.allclose(a_c.sum(1), torch.ones(d))
        x_c[:, cols] = (a_c @ vc.T).T
        k_proj = k.T @ epa.proj.weight.T + epa.proj.bias  # [d, P]: tokens projected to P
        v_proj = vs.T @ epa.proj.weight.T + epa.proj.bias
        a_s = torch.softmax(qn @ k_proj * epa.temperature_spatial[j, 0, 0], dim=1)  # [N, P]
        x_s[:, cols] = a_s @ v_proj.T
    expected = torch.cat([epa.out_spatial(x_s), epa.out_channel(x_c)], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(epa(x)[0], expected, rtol=1e-5, atol=1e-6)
    assert epa.proj.weight.shape == (p, n) and epa.out_spatial.out_features == epa.out_channel.out_features == c // 2


def test_epa_block_by_hand():
    torch.manual_seed(0)
    block = EPABlock((2, 3, 2), 8, 4, 2, attn_dropout=0.0, conv_dropout=0.0, layer_scale=1e-6).eval()
    assert block.pos_embed.shape == (1, 12, 8) and torch.all(block.gamma == 1e-6)
    with torch.no_grad():
        block.pos_embed.normal_()
        block.gamma.fill_(0.7)
        x = torch.randn(2, 8, 2, 3, 2)
        t = x.flatten(2).transpose(1, 2) + block.pos_embed
        t = t + 0.7 * block.epa(block.norm(t))
        s = t.transpose(1, 2).reshape(2, 8, 2, 3, 2)
        expected = s + block.conv_out[1](block.conv_block(s))
        torch.testing.assert_close(block(x), expected)
        # token i of the map is voxel (d, h, w) in raster order
        assert torch.equal(x.flatten(2)[:, :, 1 * 6 + 2 * 2 + 1], x[:, :, 1, 2, 1])


def epa_parameters(c, n, p, heads):
    return 60 * c * c + 9 * c + n * p + p + 2 * heads + n * c


def res_block(c_in, c_out):
    return 27 * (c_in * c_out + c_out * c_out) + (c_in * c_out if c_in != c_out else 0)


def unetr_pp_parameters(c_in, n_cls, img, dims=(32, 64, 128, 256), proj=(64, 64, 64, 32), depth=3, fs=16, heads=4,
                        dec_proj=64, dec_depth=3, stem=(2, 4, 4)):
    tokens = [(img[0] // stem[0] // 2 ** i) * (img[1] // stem[1] // 2 ** i) * (img[2] // stem[2] // 2 ** i)
              for i in range(4)]
    enc = res_block(c_in, fs) + c_in * dims[0] * stem[0] * stem[1] * stem[2] + 2 * dims[0]
    enc += sum(8 * a * b + 2 * b for a, b in zip(dims, dims[1:]))
    enc += sum(depth * epa_parameters(c, t, pr, heads) for c, t, pr in zip(dims, tokens, proj))
    dec = sum(8 * dims[i + 1] * dims[i] + dec_depth * epa_parameters(dims[i], tokens[i], dec_proj, heads)
              for i in range(3))
    dec += dims[0] * fs * stem[0] * stem[1] * stem[2] + res_block(fs, fs)
    return enc + dec + (fs + dims[0] + dims[1]) * n_cls + 3 * n_cls


def test_parameter_count_by_formula_and_against_the_paper():
    net = build_network("unetr_pp", (64, 128, 128), 1, 14)  # built, never run
    n = count_parameters(net)
    tied = sum(p.numel() for name, p in net.named_parameters() if name.endswith(("pos_embed", "epa.proj.weight")))
    print(f"UNETR++ at 64x128x128 (1 channel, 14 classes): {n:,} parameters ({n / 1e6:.2f} M; paper 42.96 M), "
          f"{tied / 1e6:.2f} M tied to the token count")
    assert n == unetr_pp_parameters(1, 14, (64, 128, 128))
    assert abs(n / 42.96e6 - 1) < 0.03
    assert net.compute_conv_feature_map_size((64, 128, 128)) < 560e6  # nnU-Net's 8 GB reference: planned unchanged


def test_forward_wiring_deep_supervision_and_levels():
    torch.manual_seed(0)
    patch = (32, 32, 64)
    net = UNETRpp(2, 3, img_size=patch, **TINY).eval()
    x = torch.randn(1, 2, *patch)
    with torch.no_grad():
        levels = net.encoder(x)
        dims, fs = TINY["dims"], TINY["feature_size"]
        grids = [(16, 8, 16), (8, 4, 8), (4, 2, 4), (2, 1, 2)]
        assert [tuple(t.shape) for t in levels] == [(1, fs, *patch)] + [(1, c, *g) for c, g in zip(dims, grids)]
        e = net.encoder
        h, manual = x, [e.conv_block(x)]
        for i in range(4):
            h = e.stages[i](e.downsample[i](h))
            manual.append(h)
        for a, b in zip(levels, manual):
            torch.testing.assert_close(a, b)
        d = net.decoder
        y2 = d.ups[0].blocks(d.ups[0].transp_conv(levels[4]) + levels[3])
        y1 = d.ups[1].blocks(d.ups[1].transp_conv(y2) + levels[2])
        y0 = d.ups[2].blocks(d.ups[2].transp_conv(y1) + levels[1])
        full = d.ups[3].blocks(d.ups[3].transp_conv(y0) + levels[0])
        torch.testing.assert_close(net(x), d.seg_layers[0](full))
        net.decoder.deep_supervision = True
        outs = net(x)
    torch.testing.assert_close(outs[1], d.seg_layers[1](y0))
    torch.testing.assert_close(outs[2], d.seg_layers[2](y1))
    scales = deep_supervision_scales(net.config)
    assert scales == [[1.0, 1.0, 1.0], [0.5, 0.25, 0.25], [0.25, 0.125, 0.125]]
    for out, s in zip(outs, scales):
        assert tuple(out.shape[2:]) == tuple(int(p * f) for p, f in zip(patch, s))


def test_a_patch_other_than_the_planned_one_is_refused():
    net = UNETRpp(1, 2, img_size=(32, 32, 32), **TINY)
    with pytest.raises(NnsslError, match=r"UNETR\+\+ was planned for patches of \(32, 32, 32\) and got \(32, 64, 32\)"
                                         r".*position embeddings"):
        net(torch.zeros(1, 1, 32, 64, 32))
    with pytest.raises(NnsslError, match=r"not divisible by \(16, 32, 32\)"):
        net.encoder(torch.zeros(1, 1, 24, 32, 32))
    with pytest.raises(NnsslError, match=r"img_size \(24, 32, 32\) must be divisible by \(16, 32, 32\)"):
        UNETRppConfig(img_size=(24, 32, 32))
    with pytest.raises(NnsslError, match=r"does not fit UNETRppPlanner.*divisible by \(16, 32, 32\)"):
        build_network("unetr_pp", (32, 48, 32), 1, 2, preset="tiny")


def test_planner_fixes_the_patch_and_the_trainer_refuses_another(pretrain_env):
    """On the session's shared tree (conftest.pretrain_tree: every architecture planned, --preset tiny)."""
    from nnssl.training.trainers.unetr import nnsslTrainer_UNETRpp

    folder = os.path.join(pretrain_env["nnUNet_preprocessed"], DS)
    with open(os.path.join(folder, ARCHITECTURES.get("unetr_pp").plans_name + ".json"), encoding="utf-8") as f:
        plans = json.load(f)
    with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as f:
        dataset_json = json.load(f)
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["arch_kwargs"]["img_size"] == cfg["patch_size"]
    assert all(p % d == 0 for p, d in zip(cfg["patch_size"], (16, 32, 32)))
    trainer = nnsslTrainer_UNETRpp({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json,
                                   device=torch.device("cpu"))
    trainer.initialize()
    assert isinstance(trainer.network, UNETRpp) and trainer.network.decoder.deep_supervision is True
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["lr"] == 1e-2
    assert trainer.loss.weight_factors == pytest.approx((1 / 1.75, 0.5 / 1.75, 0.25 / 1.75))
    assert trainer._get_deep_supervision_scales()[1] == [0.5, 0.25, 0.25]

    edited = json.loads(json.dumps(plans))
    edited["configurations"]["3d_fullres"]["patch_size"] = [p * 2 for p in cfg["patch_size"]]
    other = nnsslTrainer_UNETRpp({**edited, "continue_training": False}, "3d_fullres", 0, dataset_json,
                                 device=torch.device("cpu"))
    with pytest.raises(NnsslError, match=r"differs from the patch the network was planned for"):
        other.initialize()
