"""--cpu_precision: which dtype each choice gives, and what an nnssl trainer step does under CPU bf16.

Data: conftest's ``pretrain_tree`` (tiny Blobs dataset, plainconvunet planned)."""
import os

import pytest
import torch

from nnssl import devices
from nnssl.devices import cpu_autocast_dtype, cpu_has_native_bf16
from nnssl.errors import NnsslError
from nnssl.training.finetune import build_trainer

DS = "Dataset001_Blobs"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_precision_choices(monkeypatch):
    assert cpu_autocast_dtype("fp32", CPU) is None
    assert cpu_autocast_dtype("bf16", CPU) is torch.bfloat16
    for p in ("auto", "fp32", "bf16"):
        assert cpu_autocast_dtype(p, CUDA) is None  # nnU-Net's own fp16 AMP applies there
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert cpu_autocast_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert cpu_autocast_dtype("auto", CPU) is None  # emulated bf16 would be slower than float32
    with pytest.raises(NnsslError, match="--cpu_precision 'fp16' is not one of auto, fp32, bf16"):
        cpu_autocast_dtype("fp16", CPU)


@pytest.mark.parametrize("flags, native", [("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_bf16 amx_tile", True)])
def test_native_bf16_from_cpu_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n", encoding="utf-8")
    assert cpu_has_native_bf16(str(info)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def _conv_output_dtypes(network):
    seen = []
    first = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def test_trainer_steps_in_bf16_with_float32_outputs_weights_and_loss(pretrain_env):
    tr = build_trainer(DS, "3d_fullres", "all", device="cpu", cpu_precision="bf16").trainer
    tr.num_epochs, tr.num_iterations_per_epoch, tr.num_val_iterations_per_epoch = 1, 1, 1
    tr.on_train_start()
    try:
        batch = next(tr.dataloader_train)
        conv_dtypes = _conv_output_dtypes(tr.network)
        outputs = []
        tr.network.register_forward_hook(lambda m, i, o: outputs.append(o))  # runs after nnssl's float32 cast
        before = {n: p.detach().clone() for n, p in tr.network.named_parameters()}
        loss_bf16 = tr.validation_step(batch)["loss"]
        tr.nnssl_cpu_autocast = None  # the same weights and batch in float32
        loss_fp32 = tr.validation_step(batch)["loss"]
        tr.nnssl_cpu_autocast = torch.bfloat16
        tr.train_step(batch)
    finally:
        tr.on_train_end()
    assert conv_dtypes == [torch.bfloat16, torch.float32, torch.bfloat16]  # the convolutions ran in bf16
    assert all(o.dtype == torch.float32 for out in outputs for o in out)  # ... the loss saw float32 outputs
    assert loss_bf16 == pytest.approx(loss_fp32, rel=0.02)  # bf16 keeps ~3 significant digits
    changed = [n for n, p in tr.network.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(p.dtype == torch.float32 for p in tr.network.parameters())


def test_bf16_refused_for_a_trainer_without_nnssl_options(pretrain_env):
    from nnssl.training.finetune import train
    with pytest.raises(NnsslError, match="--cpu_precision bf16 needs an nnssl trainer; nnUNetTrainer"):
        train(DS, "3d_fullres", "all", trainer="nnUNetTrainer", device="cpu", cpu_precision="bf16", epochs=1)
    assert not os.listdir(pretrain_env["nnUNet_results"])  # refused before nnU-Net created a fold folder
    with pytest.raises(NnsslError, match="--cpu_precision bf16 needs an nnssl trainer; nnUNetTrainer"):
        build_trainer(DS, "3d_fullres", "all", trainer="nnUNetTrainer", device="cpu", cpu_precision="bf16")
    tr = build_trainer(DS, "3d_fullres", "all", trainer="nnUNetTrainer", device="cpu").trainer  # auto: float32
    assert not hasattr(tr, "nnssl_cpu_autocast")
