"""Weight injection on hand-countable tiny U-Nets, and the fine-tuning trainers' small hooks."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnssl.architectures import ARCHITECTURES, build_network
from nnssl.errors import NnsslError
from nnssl.training.injection import (LOADED, NOT_IN_CHECKPOINT, OUTPUT_HEAD, SKIPPED_NOT_TRANSFERABLE,
                                      SKIPPED_SHAPE, module_prefix, transfer_weights)
from nnssl.training.trainers.base import EpochStepLR, LinearWarmupLR, TRAINERS, nnsslTrainer
from nnssl.training.trainers.pct_net import nnsslTrainer_PCTNet


def tiny_unet(seed, features=(4, 8, 16), num_classes=2):
    """3 stages, 1 conv per stage, BatchNorm. Tensors, each counted once:
    encoder: 3 stages x (conv w, conv b, bn w, bn b, running_mean, running_var, num_batches_tracked) = 21;
    decoder.stages: 2 x 7 = 14; decoder.transpconvs: 2 x (w, b) = 4; decoder.seg_layers: 2 x (w, b) = 4."""
    torch.manual_seed(seed)
    net = PlainConvUNet(1, len(features), features, torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), num_classes, (1, 1), True,
                        torch.nn.BatchNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                        {"inplace": True}, deep_supervision=True)
    with torch.no_grad():  # every tensor distinguishable between two networks (BN starts at 1 / 0)
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
            else:  # BatchNorm's num_batches_tracked
                t.fill_(seed + 1)
    return net


def pretrained_weights(net):
    """What a pretraining checkpoint holds: the state dict (aliases included) minus the output heads."""
    return {k: v.clone() for k, v in net.state_dict().items() if ".seg_layers." not in k}


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_encoder_decoder_transfer_counts_and_values():
    src, dst = tiny_unet(0), tiny_unet(1)
    weights = pretrained_weights(src)
    # Heads present with the same shape must still not be loaded.
    weights.update({k: v.clone() for k, v in src.state_dict().items() if ".seg_layers." in k})
    before = snapshot(dst)
    report = transfer_weights(dst, weights, "encoder+decoder")

    c = report.counts()
    assert c["total"] == 21 + 14 + 4 + 4
    assert c[LOADED] == 39 and c[OUTPUT_HEAD] == 4 and report.n_left_random == 4 and report.n_skipped == 0
    assert report.by_prefix() == {
        "encoder.stages": {"loaded": 21, "skipped": 0, "left_random": 0},
        "decoder.stages": {"loaded": 14, "skipped": 0, "left_random": 0},
        "decoder.transpconvs": {"loaded": 4, "skipped": 0, "left_random": 0},
        "decoder.seg_layers": {"loaded": 0, "skipped": 0, "left_random": 4},
    }
    after = dst.state_dict()
    for k, v in after.items():
        if ".seg_layers." in k:
            assert torch.equal(v, before[k]) and not torch.equal(v, weights[k])
        else:  # aliases (decoder.encoder.*, all_modules.*) see the injected values too
            assert torch.equal(v, weights[k]), k
    assert c["loaded_values"] == sum(p.numel() for n, p in dst.state_dict().items()
                                     if ".seg_layers." not in n and not n.startswith("decoder.encoder.")
                                     and ".all_modules." not in n)


def test_encoder_only_transfer_leaves_decoder_random():
    src, dst = tiny_unet(0), tiny_unet(1)
    weights = pretrained_weights(src)
    before = snapshot(dst)
    report = transfer_weights(dst, weights, "encoder")
    assert report.counts()[LOADED] == 21
    assert report.counts()[SKIPPED_NOT_TRANSFERABLE] == 14 + 4
    assert report.n_left_random == 14 + 4 + 4
    for k, v in dst.state_dict().items():
        if k.startswith("encoder.") or k.startswith("decoder.encoder."):
            assert torch.equal(v, weights[k]), k
        else:
            assert torch.equal(v, before[k]), k
            assert ".seg_layers." in k or not torch.equal(v, weights[k]), k


def test_shape_mismatch_skipped_and_unused_keys_reported():
    src, dst = tiny_unet(0, features=(4, 8, 32)), tiny_unet(1)
    weights = pretrained_weights(src)
    weights["method_head.weight"] = torch.zeros(3)
    report = transfer_weights(dst, weights, "encoder+decoder")
    # Bottleneck stage: conv w/b, bn w/b and both running stats change with the width (6 tensors;
    # num_batches_tracked is a scalar and matches); transpconvs.0.weight is [32, 8, ...] (its bias [8] fits).
    mismatched = {k for k, s in report.status.items() if s == SKIPPED_SHAPE}
    assert mismatched == {f"encoder.stages.2.0.convs.0.{n}" for n in
                          ("conv.weight", "conv.bias", "norm.weight", "norm.bias", "norm.running_mean",
                           "norm.running_var")} | {"decoder.transpconvs.0.weight"}
    assert report.counts()[LOADED] == 39 - 7
    assert report.shapes["decoder.transpconvs.0.weight"] == ((32, 8, 2, 2, 2), (16, 8, 2, 2, 2))
    assert report.unused_checkpoint_keys == ["method_head.weight"]
    assert "shape mismatch decoder.transpconvs.0.weight" in report.format()


def test_missing_keys_left_random_and_bad_transfer_refused():
    src, dst = tiny_unet(0), tiny_unet(1)
    weights = {k: v for k, v in pretrained_weights(src).items() if not k.startswith("decoder.stages.1.")}
    report = transfer_weights(dst, weights, "encoder+decoder")
    assert report.counts()[NOT_IN_CHECKPOINT] == 7
    assert report.by_prefix()["decoder.stages"] == {"loaded": 7, "skipped": 0, "left_random": 7}
    with pytest.raises(NnsslError, match="transfer"):
        transfer_weights(dst, weights, "decoder")


def test_module_prefix():
    assert module_prefix("encoder.stages.0.0.convs.0.conv.weight") == "encoder.stages"
    assert module_prefix("decoder.seg_layers.1.bias") == "decoder.seg_layers"


def _optimizer(lr=0.01):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_linear_warmup_scales_poly_schedule():
    opt = _optimizer()
    sched = LinearWarmupLR(PolyLRScheduler(opt, 0.01, 10), opt, warmup_epochs=2)
    lrs = []
    for epoch in range(4):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.01 * 1.0 * 0.5, 0.01 * 0.9 ** 0.9 * 1.0, 0.01 * 0.8 ** 0.9, 0.01 * 0.7 ** 0.9]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    sched.step(0)  # stateless: going back (as on resume) gives the same value
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


def test_epoch_step_lr_halves_every_step_epochs():
    """EpochStepLR alone (the PCT-Net trainer's use of it: tests/test_schedules.py)."""
    opt = _optimizer()
    sched = EpochStepLR(opt, 1e-3, step_epochs=20)
    for epoch, lr in ((0, 1e-3), (19, 1e-3), (20, 5e-4), (45, 2.5e-4)):
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)


def test_pct_deep_supervision_scales_match_network_outputs():
    from nnssl.architectures.pct_net import PCTNet

    kwargs = {"channels": (4, 8, 16, 16, 32), "heads": (1, 2, 2), "window_size": 4}
    fake = SimpleNamespace(enable_deep_supervision=True,
                           configuration_manager=SimpleNamespace(network_arch_init_kwargs=kwargs))
    scales = nnsslTrainer_PCTNet._get_deep_supervision_scales(fake)
    assert scales == [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25], [0.25, 0.125, 0.125]]
    torch.manual_seed(0)
    net = PCTNet(1, 2, deep_supervision=True, **kwargs).eval()
    shape = (8, 32, 32)
    with torch.no_grad():
        outs = net(torch.zeros(1, 1, *shape))
    assert [tuple(o.shape[2:]) for o in outs] == [tuple(int(s * f) for s, f in zip(shape, sc)) for sc in scales]


def test_trainer_registry_names_are_class_names():
    assert TRAINERS.get("nnsslTrainer") is nnsslTrainer
    assert TRAINERS.get("nnsslTrainer_PCTNet") is nnsslTrainer_PCTNet
    assert all(cls.__name__ == name for name, cls in TRAINERS.items())


class _LoopStub:
    """What FinetuneOptionsMixin needs from nnU-Net's trainer, without nnU-Net's training loop."""

    def on_train_epoch_start(self):
        pass

    def print_to_log_file(self, *args):
        pass


def _frozen_trainer(network, optimizer, freeze_epochs=1):
    from nnssl.training.trainers.base import FinetuneOptionsMixin

    tr = type("FreezeStub", (FinetuneOptionsMixin, _LoopStub), {})()
    tr.network, tr.optimizer, tr.current_epoch = network, optimizer, 0
    tr.nnssl_freeze_encoder_epochs = freeze_epochs
    tr._nnssl_install_encoder_freeze()
    return tr


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_frozen_encoder_does_not_move_for_every_architecture(name):
    """One SGD step (momentum, weight decay) in a frozen epoch: every encoder parameter keeps its
    exact value, every other parameter that gets a gradient moves; requires_grad never changes."""
    spec = ARCHITECTURES.get(name)
    preset = "tiny" if "tiny" in spec.presets else None
    patch = spec.planner_class().without_dataset(1, 2, preset=preset).smallest_patch()
    torch.manual_seed(0)
    net = build_network(name, patch, 1, 2, preset=preset)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    tr = _frozen_trainer(net, opt)
    tr.on_train_epoch_start()
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    out = net(torch.randn(2, 1, *patch))
    (out[0] if isinstance(out, (list, tuple)) else out).square().mean().backward()
    with_grad = {k for k, p in net.named_parameters() if p.grad is not None}
    opt.step()
    assert all(p.requires_grad for p in net.parameters())
    for k, p in net.named_parameters():
        if k.startswith("encoder."):
            assert torch.equal(p, before[k]), k
        elif k in with_grad:
            assert not torch.equal(p, before[k]), k
    assert any(not k.startswith("encoder.") for k in with_grad)


DDP_FREEZE_SCRIPT = r'''
import json, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
sys.path.insert(0, sys.argv[1])
from test_injection import _frozen_trainer, tiny_unet
from nnssl.checkpoints import weights_sha256

net = tiny_unet(0)  # the same start on both ranks
ddp = DistributedDataParallel(net)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
tr = _frozen_trainer(ddp, opt, freeze_epochs=1)
start = {k: v.clone() for k, v in net.state_dict().items()}
report = {}
for epoch in (0, 1):
    tr.current_epoch = epoch
    tr.on_train_epoch_start()
    for step in range(2):
        g = torch.Generator().manual_seed(100 * rank + 10 * epoch + step)  # each rank its own data
        opt.zero_grad(set_to_none=True)
        out = ddp(torch.randn(2, 1, 8, 16, 16, generator=g))
        sum(o.square().mean() for o in out).backward()  # every output in the loss, as nnU-Net's DS loss
        opt.step()
    state = net.state_dict()
    hashes = [None, None]
    # parameters only: BatchNorm running statistics follow each rank's own data (DDP re-broadcasts them)
    dist.all_gather_object(hashes, weights_sha256(dict(net.named_parameters())))
    report[epoch] = {
        "ranks_agree": hashes[0] == hashes[1],
        "encoder_unchanged": all(torch.equal(state[k], start[k]) for k in start
                                 if k.startswith("encoder.") and state[k].is_floating_point()
                                 and "running" not in k),
        "decoder_changed": any(not torch.equal(state[k], start[k]) for k in start if k.startswith("decoder.stages")),
    }
if rank == 0:
    print("RESULT " + json.dumps(report))
dist.destroy_process_group()
'''


def test_frozen_encoder_under_ddp_with_two_gloo_processes(tmp_path):
    """--freeze_encoder_epochs under torchrun: 2 CPU processes (gloo), DDP-wrapped network, different
    data per rank. Epoch 0 (frozen): the encoder keeps its weights, the decoder trains, the ranks stay
    identical; epoch 1 (unfrozen): the encoder trains too and the ranks still agree (with
    requires_grad toggled after wrapping, DDP's reduction breaks here)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "ddp_freeze.py"
    script.write_text(DDP_FREEZE_SCRIPT, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           os.path.dirname(__file__)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(next(li for li in r.stdout.splitlines() if li.startswith("RESULT "))[len("RESULT "):])
    assert report["0"] == {"ranks_agree": True, "encoder_unchanged": True, "decoder_changed": True}
    assert report["1"] == {"ranks_agree": True, "encoder_unchanged": False, "decoder_changed": True}
