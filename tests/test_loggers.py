"""Tracking of pretraining: W&B (offline) and TensorBoard files read back with every loss term, lr
and data wait; switches and refusals; --tensorboard / --no_pbar reach the engine.

wandb and tensorboard are optional extras (in the `dev` extra): without them these tests are
skipped locally but FAIL under CI=true.
"""
import glob
import json
import os
import struct
import sys

import pytest
import torch

from nnssl.errors import NnsslError
from nnssl.training.loggers import switch_on, wanted

DS = "Dataset001_Blobs"


def require(module: str):
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"'{module}' is not installed; CI installs it with the dev extra (pip install -e '.[dev]')")
        pytest.skip(f"'{module}' is not installed (optional extra)")


def read_wandb_records(path):
    """The protobuf records of a .wandb transaction log (LevelDB log format: a 7-byte file header
    ':W&B' + magic + version, then 32 KiB blocks of records, each with a 7-byte header: crc32c,
    length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_pretraining_logs_every_term_to_wandb_offline_and_tensorboard(pretrain_env, tmp_path, monkeypatch, capfd):
    require("wandb")
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from nnssl.training.pretrainer import pretrain

    monkeypatch.setenv("nnUNet_wandb_enabled", "1")
    monkeypatch.setenv("nnUNet_wandb_project", "nnssl_tracking_test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("nnUNet_wandb_mode", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var))
    out = tmp_path / "run"
    # Volume Fusion halves the lr every lr_step_iterations: 1e-3, 1e-3, 5e-4 for iterations 0, 1, 2.
    # Two iterations, then --c to three: the resumed run logs into the same W&B run.
    for total, resume in ((2, False), (3, True)):
        pretrain(DS, "volume_fusion", iterations=total, iterations_per_epoch=2, batch_size=2, device="cpu",
                 num_workers=0, overrides=["lr_step_iterations=2"], output_folder=str(out), resume=resume,
                 tensorboard=True, show_progress=False)
    assert "%|" not in capfd.readouterr().err  # no tqdm bar with show_progress=False
    terms = {"loss", "ce", "dice"}  # Volume Fusion's loss terms: 0.5 CE + 0.5 Dice and their sum
    history = torch.load(out / "checkpoint_final.pth", weights_only=True)["resume"]["loss_history"]
    assert set(history[0]["losses"]) == terms

    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2  # one per process that logged
    records = [r for f in files for r in read_wandb_records(f)]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.project for r in runs} == {"nnssl_tracking_test"} and len({r.run_id for r in runs}) == 1
    steps = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            steps.setdefault(r.history.step.num, {}).update(row)
    assert sorted(steps) == [0, 1, 2]
    for it, row in steps.items():
        assert {f"loss/{t}" for t in terms} | {"lr", "data_wait_s"} <= set(row)
        assert row["data_wait_s"] >= 0
        assert row["loss/loss"] == pytest.approx(row["loss/ce"] * 0.5 + row["loss/dice"] * 0.5, rel=1e-5)
    assert [steps[i]["lr"] for i in range(3)] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert "epoch/time_s" in steps[1] and "epoch/data_wait_fraction" in steps[2]  # ends of epochs 0 and 1
    for term in terms:  # the engine's epoch means are the means of the logged iterations
        assert history[0]["losses"][term] == pytest.approx((steps[0][f"loss/{term}"] + steps[1][f"loss/{term}"]) / 2)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {f"loss/{t}" for t in terms} | {"lr", "data_wait_s", "epoch/time_s"} <= set(events.Tags()["scalars"])
    for key in [f"loss/{t}" for t in terms] + ["lr"]:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [0, 1, 2]
        assert [s.value for s in scalars] == pytest.approx([steps[i][key] for i in range(3)], rel=1e-6)


def test_switches_and_missing_packages_are_refused(monkeypatch):
    monkeypatch.delenv("nnUNet_wandb_enabled", raising=False)
    monkeypatch.delenv("nnssl_tensorboard", raising=False)
    assert wanted() == []
    monkeypatch.setenv("nnUNet_wandb_enabled", "yes")
    with pytest.raises(NnsslError, match="nnUNet_wandb_enabled='yes' is not 0/1"):
        switch_on("nnUNet_wandb_enabled")
    monkeypatch.setenv("nnUNet_wandb_enabled", "true")
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb gives on import
    with pytest.raises(NnsslError, match="nnUNet_wandb_enabled=1 needs the 'wandb' package.*pip install wandb"):
        wanted()
    monkeypatch.setenv("nnUNet_wandb_enabled", "0")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(NnsslError, match="--tensorboard / nnssl_tensorboard=1 needs the 'tensorboard' package"):
        wanted(tensorboard=True)
    monkeypatch.setenv("nnssl_tensorboard", "1")
    with pytest.raises(NnsslError, match="'tensorboard' package"):
        wanted()


def test_cli_flags_reach_the_engine(monkeypatch, capsys):
    import nnssl.training.pretrainer as pretrainer
    from nnssl.cli.pretrain import main

    seen = {}
    monkeypatch.setattr(pretrainer, "pretrain", lambda *a, **k: seen.update(k) or "/out")
    with pytest.raises(SystemExit) as e:
        main(["-d", "1", "-m", "volume_fusion", "--tensorboard", "--no_pbar"])
    assert e.value.code == 0
    assert seen["tensorboard"] is True and seen["show_progress"] is False
    with pytest.raises(SystemExit):
        main(["-d", "1", "-m", "volume_fusion"])
    assert seen["tensorboard"] is False and seen["show_progress"] is True
