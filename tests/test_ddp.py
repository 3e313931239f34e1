"""nnssl_train -num_gpus: DDP fine-tuning with 2 gloo CPU processes from a pretrained checkpoint
(every rank starts from the same injected weights), and the refusals."""
import hashlib
import json
import os
import socket

import pytest
import torch

from nnssl.errors import NnsslError
from nnssl.training.ddp import check_num_processes, train_ddp
from nnssl.training.same_start import check_same_start

DS = "Dataset001_Blobs"


def sha256_of(state, keys):
    """nnssl.checkpoints.weights_sha256's definition, written out: per name in sorted order
    "name:shape:dtype" then the raw bytes."""
    h = hashlib.sha256()
    for k in sorted(keys):
        t = state[k].contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


def test_two_gloo_processes_fine_tune_from_the_same_injected_start(pretrain_env, tmp_path, monkeypatch, capfd):
    from nnssl.training.pretrainer import pretrain

    monkeypatch.setenv("MASTER_ADDR", "localhost")  # train_ddp sets both; restored after the test
    monkeypatch.setenv("MASTER_PORT", free_port())
    folder = pretrain(DS, "volume_fusion", iterations=1, iterations_per_epoch=1, batch_size=2, device="cpu",
                      num_workers=0, output_folder=str(tmp_path / "pretraining"), show_progress=False)
    ckpt_path = os.path.join(folder, "checkpoint_final.pth")
    # Without nnU-Net's final validation (distributed over the ranks too, but a minute on 2 busy cores).
    out = train_ddp(2, DS, "3d_fullres", "all", pretrained=ckpt_path, epochs=1, iterations_per_epoch=2,
                    val_iterations=1, device="cpu", final_validation=False)
    printed = capfd.readouterr().out
    # nnU-Net's trainer split the plans' global batch of 2 over the two ranks
    assert "worker 0 batch_size 1" in printed and "worker 1 batch_size 1" in printed

    fold_dir = out["output_folder"]
    report = json.load(open(os.path.join(fold_dir, "nnssl_pretrained.json")))
    loaded = report["report"]["keys"]["loaded"]
    pretrained = torch.load(ckpt_path, map_location="cpu", weights_only=True)["network_weights"]
    network_keys = sum(report["report"]["keys"].values(), [])
    assert [k for k in network_keys if k.startswith("encoder.")] == [k for k in loaded if k.startswith("encoder.")]
    ranks = report["ranks"]
    assert ranks["world_size"] == 2 and ranks["fingerprints"][0] == ranks["fingerprints"][1]
    assert ranks["fingerprints"][0]["loaded_sha256"] == sha256_of(pretrained, loaded)  # the checkpoint's tensors

    final = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 1
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in final["network_weights"].items()}
    assert sha256_of(weights, loaded) != sha256_of(pretrained, loaded)  # the 2 iterations moved the weights


def test_refusals(monkeypatch, capsys):
    with pytest.raises(NnsslError, match="-num_gpus must be at least 1"):
        check_num_processes(0, "cpu")
    assert check_num_processes(2, "cpu") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(NnsslError, match="-num_gpus 2: torch sees 1 CUDA GPU"):
        check_num_processes(2, "cuda")
    same = {"loaded_sha256": "a", "network_sha256": "b"}
    check_same_start([same, dict(same)])
    with pytest.raises(NnsslError, match="rank 2 starts from other weights than rank 0"):
        check_same_start([same, dict(same), {**same, "network_sha256": "c"}])
