"""The pretraining engine: deterministic loader, lr schedules, --set parsing, resume, refusals, DDP."""
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnssl.checkpoints import load_resume_checkpoint, weights_sha256
from nnssl.cli.pretrain import main as pretrain_main
from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS
from nnssl.training.pretrain_data import (PretrainLoader, batch_from_item, draw_crop_box, image_region, make_loader,
                                         sample_images, shutdown)
from nnssl.training.pretrain_setup import apply_overrides, prepare
from nnssl.training.pretrainer import pretrain
from nnssl.training.schedules import LRSchedule

DS = "Dataset001_Blobs"
METHOD = "volume_fusion"  # the method of the engine-level tests (every method is run in test_pretrain_methods)


def run(tmp_path, name, **kw):
    args = dict(dataset=DS, method=METHOD, iterations=2, iterations_per_epoch=1, batch_size=2, device="cpu",
                num_workers=0, output_folder=str(tmp_path / name))
    args.update(kw)
    return pretrain(**args)


# --- loader ---

def test_batches_do_not_depend_on_worker_count_or_start(pretrain_env):
    s = prepare(DS, METHOD, batch_size=2)

    def loader(start, workers):
        return PretrainLoader(s.data_folder, 2, s.crop_size, s.method_cls, s.cfg, seed=7, start_iteration=start,
                              num_workers=workers)

    reference = {i: loader(0, 0).make(i) for i in range(3, 7)}
    for workers in (0, 2):
        aug = make_loader(loader(3, workers), workers)
        try:
            items = [next(aug) for _ in range(4)]
        finally:
            shutdown(aug)
        assert [it["iteration"] for it in items] == [3, 4, 5, 6]
        for it in items:
            batch = batch_from_item(it)
            for k, v in reference[it["iteration"]].items():
                assert torch.equal(batch[k], v), (workers, it["iteration"], k)
    other_rank = PretrainLoader(s.data_folder, 2, s.crop_size, s.method_cls, s.cfg, seed=7, rank=1).make(3)
    assert not torch.equal(other_rank["data"], reference[3]["data"])


def test_crop_box_positions():
    rng = np.random.default_rng(0)
    starts = {tuple(b[0] for b in draw_crop_box(rng, (10, 3), (4, 5))) for _ in range(400)}
    assert {s[0] for s in starts} == set(range(0, 7))  # crop inside a larger axis: start 0..6
    assert {s[1] for s in starts} == {-2, -1, 0}  # volume inside a larger crop: offset 0..2
    assert draw_crop_box(rng, (4, 4), (4, 4)) == [[0, 4], [0, 4]]


def test_image_region_by_hand():
    # axis 0: crop [3, 7) inside a volume of 10; axis 1: a volume of 3 at offset 2 of a crop of 5
    assert image_region([[3, 7], [-2, 3]], (10, 3)) == [[0, 4], [2, 5]]
    assert image_region([[6, 10], [0, 3]], (10, 3)) == [[0, 4], [0, 3]]


def test_volumes_smaller_than_the_crop_are_padded_with_zero(pretrain_env):
    folder = prepare(DS, METHOD).data_folder
    ds = nnUNetDatasetBlosc2(folder)
    ids = list(ds.identifiers)
    volume = np.asarray(ds.load_case(ids[1])[0][:], dtype=np.float32)
    shape = volume.shape[1:]
    crop = tuple(n + extra for n, extra in zip(shape, (4, 8, 4)))  # larger than the case on every axis
    images, meta = sample_images(ds, ids, [1], crop, np.random.default_rng(11))
    assert images.shape == (1, 1, *crop) and images.dtype == np.float32
    # where is the volume? search every offset
    found = [o for o in np.ndindex(4 + 1, 8 + 1, 4 + 1)
             if np.array_equal(images[0][(slice(None),) + tuple(slice(a, a + n) for a, n in zip(o, shape))], volume)]
    assert len(found) == 1
    offset = found[0]
    assert meta["keys"] == [ids[1]]
    assert meta["boxes"] == [[[-a, -a + c] for a, c in zip(offset, crop)]]
    assert meta["image_region"] == [[[a, a + n] for a, n in zip(offset, shape)]]
    mask = np.ones(crop, bool)
    mask[tuple(slice(a, a + n) for a, n in zip(offset, shape))] = False
    assert mask.any() and np.all(images[0][:, mask] == 0)


def test_volume_fusion_batches_pair_two_different_scans(pretrain_env):
    s = prepare(DS, METHOD, batch_size=2)
    loader = PretrainLoader(s.data_folder, 2, s.crop_size, s.method_cls, s.cfg, seed=0)
    assert len(loader.identifiers) == 3
    pairs = [tuple(loader.images(i)[1]["keys"]) for i in range(40)]
    assert all(a != b for a, b in pairs)  # today's draw with replacement pairs a scan with itself 1 time in 3
    assert len(set(pairs)) == 6  # every ordered pair of the 3 scans occurs


def test_volume_fusion_refuses_a_single_scan_before_training(tmp_path):
    shape = (1, 8, 8, 8)
    nnUNetDatasetBlosc2.save_case(np.zeros(shape, np.float32), np.zeros(shape, np.int8), {},
                                  str(tmp_path / "only"), chunks=shape, blocks=shape)
    cls = METHODS.get(METHOD)
    with pytest.raises(NnsslError, match="two different scans"):
        PretrainLoader(str(tmp_path), 2, (8, 8, 8), cls, cls.config_class(), seed=0)


# --- schedules and --set ---

def test_lr_schedules_hand_computed():
    step = LRSchedule("step", 1e-3, 100, step_iterations=10, gamma=0.5)
    assert [step.lr(i) for i in (0, 9, 10, 25)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    poly = LRSchedule("poly", 1e-2, 100)
    assert poly.lr(0) == 1e-2 and poly.lr(50) == pytest.approx(1e-2 * 0.5 ** 0.9)
    cos = LRSchedule("cosine", 1.0, 110, warmup_iterations=10)
    assert [cos.lr(i) for i in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert cos.lr(60) == pytest.approx(0.5) and cos.lr(110) == pytest.approx(0.0)
    with pytest.raises(NnsslError, match="lr_schedule"):
        LRSchedule("linear", 1.0, 10)
    with pytest.raises(NnsslError, match="lr_step_iterations"):
        LRSchedule("step", 1.0, 10)


@dataclass
class _Cfg:
    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "a"
    box: Tuple[int, int, int] = (1, 2, 3)
    sizes: Tuple[float, ...] = (1.0,)
    maybe: Optional[int] = None


def test_set_parses_with_field_types():
    cfg = apply_overrides(_Cfg(), ["n=3", "x=1e-4", "flag=true", "name=b", "box=4,5,6", "sizes=0.5,2", "maybe=7"])
    assert cfg == _Cfg(3, 1e-4, True, "b", (4, 5, 6), (0.5, 2.0), 7)
    assert apply_overrides(_Cfg(maybe=2), ["maybe=none"]).maybe is None
    with pytest.raises(NnsslError, match="Valid keys: n, x, flag, name, box, sizes, maybe"):
        apply_overrides(_Cfg(), ["nn=3"])
    for bad, msg in (("n=3.5", "not a valid int"), ("x=fast", "not a valid float"), ("flag=maybe", "bool"),
                     ("box=1,2", "expected 3"), ("n", "key=value")):
        with pytest.raises(NnsslError, match=msg):
            apply_overrides(_Cfg(), [bad])


def test_cli_refuses_bad_set_values_before_writing_anything(pretrain_env, tmp_path, capsys):
    base = ["-d", DS, "-m", METHOD, "-device", "cpu", "--iterations", "1", "-o", str(tmp_path / "o")]
    for override, expected in (("nope=1", "Valid keys"), ("K=four", "not a valid int"),
                               ("optimizer=lion", "Unknown optimizer"),
                               ("lr=-1", "volume_fusion: lr=-1.0 is not valid: it must be > 0"),
                               ("lr=nan", "volume_fusion: lr=nan is not valid: it must be > 0 (and finite)"),
                               ("weight_decay=-1", "weight_decay=-1.0 is not valid: it must be >= 0")):
        with pytest.raises(SystemExit) as e:
            pretrain_main(base + ["--set", override])
        assert e.value.code == 2
        assert expected in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_set_values_reach_config_json_and_checkpoint(pretrain_env, tmp_path):
    out = run(tmp_path, "k2", iterations=1, overrides=["K=2", "lr=5e-4"])
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["config"]["K"] == 2 and config["config"]["lr"] == 5e-4 and config["config"]["batch_size"] == 2
    ckpt = load_resume_checkpoint(os.path.join(out, "checkpoint_final.pth"))
    assert ckpt["method"]["config"]["K"] == 2
    seg = [v for k, v in ckpt["resume"]["network_excluded"].items() if k.endswith("seg_layers.0.weight")]
    assert seg and seg[0].shape[0] == 3  # K + 1 output channels


def test_batch_size_below_method_minimum_is_refused(pretrain_env, tmp_path):
    assert METHODS.get(METHOD).min_batch_size == 2
    with pytest.raises(NnsslError, match="at least 2"):
        run(tmp_path, "bs1", batch_size=1)


# --- checkpoints and resume ---

def test_resume_is_bit_exact(pretrain_env, tmp_path, monkeypatch):
    # the uninterrupted run loads with 2 background workers, the interrupted one in-process
    full = run(tmp_path, "full", iterations=4, iterations_per_epoch=2, num_workers=2)
    cls = METHODS.get(METHOD)
    real, calls = cls.forward_loss, []

    def interrupted(self, network, batch):
        if len(calls) == 2:  # iteration 2, after checkpoint_latest at iteration 2 was written
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, network, batch)

    monkeypatch.setattr(cls, "forward_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "part", iterations=4, iterations_per_epoch=2)
    part = str(tmp_path / "part")
    assert load_resume_checkpoint(os.path.join(part, "checkpoint_latest.pth"))["iteration"] == 2
    assert not os.path.exists(os.path.join(part, "checkpoint_final.pth"))
    monkeypatch.setattr(cls, "forward_loss", real)
    run(tmp_path, "part", iterations=4, iterations_per_epoch=2, resume=True)
    a = load_resume_checkpoint(os.path.join(full, "checkpoint_final.pth"))
    b = load_resume_checkpoint(os.path.join(part, "checkpoint_final.pth"))
    assert a["iteration"] == b["iteration"] == 4
    for k, v in a["network_weights"].items():
        assert torch.equal(v, b["network_weights"][k]), k
    for k, v in a["resume"]["network_excluded"].items():
        assert torch.equal(v, b["resume"]["network_excluded"][k]), k
    for pid, state in a["resume"]["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["resume"]["optimizer"]["state"][pid][k])
    assert [h["losses"] for h in a["resume"]["loss_history"]] == [h["losses"] for h in b["resume"]["loss_history"]]


def test_c_without_checkpoint_and_existing_run_without_c_are_refused(pretrain_env, tmp_path):
    with pytest.raises(NnsslError, match="no checkpoint_latest.pth"):
        run(tmp_path, "empty", resume=True)
    out = run(tmp_path, "done", iterations=1)
    before = os.path.getmtime(os.path.join(out, "checkpoint_final.pth"))
    with pytest.raises(NnsslError, match="Pass --c"):
        run(tmp_path, "done", iterations=1)
    assert os.path.getmtime(os.path.join(out, "checkpoint_final.pth")) == before
    with pytest.raises(NnsslError, match="seed"):  # --c keeps the run's settings
        run(tmp_path, "done", iterations=2, resume=True, seed=1)
    with pytest.raises(NnsslError) as e:  # the changed key, not the two whole method dicts
        run(tmp_path, "done", iterations=2, resume=True, overrides=["lr=5e-4"])
    lr = METHODS.get(METHOD).config_class().lr
    assert f"these differ: method.config.lr: checkpoint {lr!r}, now 0.0005. Drop" in str(e.value)


def test_second_writer_of_a_run_folder_is_refused(pretrain_env, tmp_path, capsys):
    """Before: both runs printed "Finished" and the second overwrote the first."""
    from test_locks import dead_pid, write_lock

    out = str(tmp_path / "busy")
    write_lock(out, os.getpid())  # a live writer: this very process
    argv = ["-d", DS, "-m", METHOD, "-device", "cpu", "--iterations", "1", "--batch_size", "2", "--num_workers", "0",
            "-o", out]
    with pytest.raises(SystemExit) as e:
        pretrain_main(argv)
    assert e.value.code == 2
    assert f"being written by another run: process {os.getpid()}" in capsys.readouterr().err
    assert os.listdir(out) == [".nnssl.lock"]
    pid = dead_pid()
    write_lock(out, pid)
    with pytest.raises(SystemExit) as e:
        pretrain_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"stale lock {out}/.nnssl.lock: process {pid}" in err and f"rm {out}/.nnssl.lock" in err


def test_corrupted_latest_checkpoint_is_refused(pretrain_env, tmp_path):
    out = run(tmp_path, "c", iterations=1)
    latest = os.path.join(out, "checkpoint_latest.pth")
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 3)
    with pytest.raises(NnsslError) as e:
        run(tmp_path, "c", iterations=2, resume=True)
    assert "checkpoint_latest.pth" in str(e.value) and "corrupted" in str(e.value)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(pretrain_env, tmp_path, monkeypatch):
    cls = METHODS.get(METHOD)
    real, calls = cls.forward_loss, []

    def nan_at_3(self, network, batch):
        losses = real(self, network, batch)
        calls.append(1)
        return {**losses, "loss": losses["loss"] * float("nan")} if len(calls) == 4 else losses

    monkeypatch.setattr(cls, "forward_loss", nan_at_3)
    with pytest.raises(NnsslError, match="Non-finite loss at iteration 3") as e:
        run(tmp_path, "nan", iterations=6, iterations_per_epoch=2)
    assert "last good checkpoint" in str(e.value)
    latest = os.path.join(tmp_path, "nan", "checkpoint_latest.pth")
    ckpt = load_resume_checkpoint(latest)
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["network_weights"].values())
    assert not os.path.exists(os.path.join(tmp_path, "nan", "checkpoint_final.pth"))


def test_torchrun_two_processes_agree(pretrain_env, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "nnssl.cli.pretrain", "-d", DS, "-m", METHOD, "--iterations", "2", "--iterations_per_epoch", "1",
           "--batch_size", "4", "-device", "cpu", "--num_workers", "0", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "training_log.txt", encoding="utf-8") as f:
        log = f.read().splitlines()
    line = next(li for li in log if "weights sha256 per rank" in li)
    hashes = re.findall(r"[0-9a-f]{64}", line)
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    # ... after training on different data: each rank's first batch is its own
    data = re.findall(r"[0-9a-f]{64}", next(li for li in log if "first batch sha256 per rank" in li))
    assert len(data) == 2 and data[0] != data[1]
    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=True)
    assert weights_sha256(ckpt["network_weights"]) == hashes[0]
    with open(out / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["world_size"] == 2 and config["batch_size_per_process"] == 2


def test_pretrain_leaves_the_callers_global_rngs_alone(pretrain_env, tmp_path):
    import random

    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    run(tmp_path, "rng", iterations=1)
    assert torch.equal(torch.get_rng_state(), states[0])
    after = np.random.get_state()
    assert after[0] == states[1][0] and np.array_equal(after[1], states[1][1]) and after[2:] == states[1][2:]
    assert random.getstate() == states[2]


def test_grad_clip_is_a_config_field_read_by_the_engine_and_logged(pretrain_env, tmp_path, monkeypatch):
    norms, real = [], torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    assert METHODS.get(METHOD).config_class().grad_clip is None  # MIS-FM clips nothing
    off = run(tmp_path, "off", iterations=1)
    assert norms == []
    on = run(tmp_path, "on", iterations=2, overrides=["grad_clip=0.5"])
    assert norms == [0.5, 0.5]
    with open(os.path.join(off, "training_log.txt"), encoding="utf-8") as f:
        assert "Gradient clipping off" in f.read()
    with open(os.path.join(on, "training_log.txt"), encoding="utf-8") as f:
        assert "Gradient clipping on, max gradient norm 0.5" in f.read()
    with pytest.raises(NnsslError, match="grad_clip"):
        run(tmp_path, "bad", iterations=1, overrides=["grad_clip=-1"])
