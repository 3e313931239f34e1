"""nnsslTrainer_Short: per-iteration warm-up + poly schedule, parameter groups, per-group lrs after injection.

Expected learning rates are computed by hand: peak 3e-3, poly exponent 0.9,
0.5 ** 0.9 = 0.535887, 0.25 ** 0.9 = 0.287175, 0.6 ** 0.9 = 0.631446.
"""
import os
import types

import pytest
import torch

from nnssl.training.schedules import LRSchedule
from nnssl.training.trainers.short import (IterationLR, ShortRecipe, nnsslTrainer_Short, parameter_groups,
                                           transferred_groups)

DS = "Dataset001_Blobs"


def _optimizer(scales):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "name": f"g{i}", "lr_scale": s}
              for i, s in enumerate(scales)]
    return torch.optim.AdamW(groups, lr=1.0)


def test_iteration_schedule_warmup_poly_and_group_scales():
    opt = _optimizer([1.0, 0.5])
    sched = IterationLR(opt, LRSchedule("poly", 3e-3, total_iterations=100, warmup_iterations=5), 20)
    expected = {0: 0.6e-3, 1: 1.2e-3, 4: 3e-3, 50: 1.607661e-3, 75: 0.861525e-3}
    for it, lr in expected.items():
        sched.set_iteration(it)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-5), it
        assert opt.param_groups[1]["lr"] == pytest.approx(lr / 2, rel=1e-5), it
    sched.step(2)  # nnU-Net's epoch start: epoch 2 of 20 iterations = iteration 40
    assert sched.get_last_lr()[0] == pytest.approx(3e-3 * 0.631446, rel=1e-5)
    sched.set_iteration(500)  # past the end (a longer --c): the last iteration's lr, never negative/complex
    assert sched.get_last_lr()[0] == pytest.approx(4.75468e-5, rel=1e-5)  # 3e-3 * 0.01 ** 0.9


def _warmup(epochs, ipe, warmup_epochs=0, fraction=0.05):
    t = types.SimpleNamespace(num_epochs=epochs, num_iterations_per_epoch=ipe, nnssl_warmup_epochs=warmup_epochs,
                              recipe=ShortRecipe(warmup_fraction=fraction))
    return nnsslTrainer_Short.warmup_iterations(t)


def test_warmup_length():
    assert _warmup(30, 20) == 30  # 5 % of 600 iterations
    assert _warmup(2, 2) == 1  # never 0
    assert _warmup(30, 20, warmup_epochs=2) == 40  # --warmup_epochs counts whole epochs of iterations
    assert _warmup(1, 1) == 0  # a single-iteration run has no room for a warm-up


def _tiny_unet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 3, (4, 8, 8), torch.nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 3, (1, 1),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                         nonlin=torch.nn.LeakyReLU, deep_supervision=True)


def test_parameter_groups_and_transferred_groups():
    net = _tiny_unet()
    g = parameter_groups(net)
    # Hand count: each conv = weight + bias + affine norm weight + bias = 4 tensors.
    # encoder 3 stages x 2 convs = 24; decoder 2 stages x 1 conv = 8 plus 2 transposed convs x 2 = 12;
    # heads: 2 deep-supervision output convs x 2 = 4. Shared decoder.encoder.* counted once.
    assert {k: len(v) for k, v in g.items()} == {"encoder": 24, "decoder": 12, "heads": 4}
    names = [n for n, _ in net.named_parameters()]
    enc = [n for n in names if n.startswith("encoder.")]
    assert transferred_groups(net, enc) == ["encoder"]
    body = [n for n in names if ".seg_layers." not in n]
    assert transferred_groups(net, body) == ["encoder", "decoder"]
    assert transferred_groups(net, enc[:-1]) == []  # one encoder tensor not loaded: not "transferred"


def test_finetune_from_pretrained_lowers_transferred_lrs(pretrain_env, tmp_path, monkeypatch):
    from nnssl.training.finetune import train
    from nnssl.training.pretrainer import pretrain

    folder = pretrain(DS, "volume_fusion", iterations=2, iterations_per_epoch=2, batch_size=2, device="cpu",
                      num_workers=0, output_folder=str(tmp_path / "pre"))
    monkeypatch.setattr(nnsslTrainer_Short, "recipe", ShortRecipe(lr=3e-3, pretrained_lr_scale=0.1))
    out = train(DS, "3d_fullres", "all", trainer="nnsslTrainer_Short", pretrained=os.path.join(folder,
                "checkpoint_final.pth"), epochs=2, iterations_per_epoch=2, val_iterations=1, warmup_epochs=1,
                device="cpu", final_validation=False)
    ckpt = torch.load(os.path.join(out["output_folder"], "checkpoint_final.pth"), weights_only=False)
    # Logged at each epoch start for group 0 (encoder, transferred -> x 0.1): warm-up of 2 iterations,
    # iteration 0 = 1.5e-3; epoch 1 starts at iteration 2 = 3e-3 * 0.5 ** 0.9.
    assert ckpt["logging"]["lrs"] == pytest.approx([1.5e-4, 1.607661e-4], rel=1e-5)
    groups = {g["name"]: g for g in ckpt["optimizer_state"]["param_groups"]}
    # After the last step (iteration 3 = 3e-3 * 0.25 ** 0.9): Volume Fusion transfers encoder + decoder.
    assert groups["encoder"]["lr"] == pytest.approx(0.861525e-4, rel=1e-5)
    assert groups["decoder"]["lr"] == pytest.approx(0.861525e-4, rel=1e-5)
    assert groups["heads"]["lr"] == pytest.approx(0.861525e-3, rel=1e-5)
    assert not os.path.isdir(os.path.join(out["output_folder"], "validation"))  # final_validation=False
    assert os.path.isfile(os.path.join(out["output_folder"], "progress.png"))  # drawn after the last epoch
