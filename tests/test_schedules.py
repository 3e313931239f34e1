"""Learning-rate schedules sized to the run: same shape at any --iterations / --epochs, refusals, and the
printed schedule equals the applied one."""
import math
import os
import re

import pytest
import torch

from nnssl.cli.pretrain import main as pretrain_main
from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS
from nnssl.ssl.masked_kmeans import MaskedKMeansConfig
from nnssl.ssl.volume_fusion import VolumeFusionConfig
from nnssl.training.pretrainer import DEFAULT_LR, pretrain
from nnssl.training.schedules import LRSchedule, format_lr_summary, schedule_from_config, summarize_lrs
from nnssl.training.trainers.base import EpochStepLR, FinetuneOptionsMixin
from nnssl.training.trainers.logonet import warmup_epochs_for

SHORT, LONG = 100, 100_000
FRACTIONS = [k / 20 for k in range(1, 21)]  # 0.05, 0.10, ..., 1.0 of the run


def at_fraction(schedule, f):
    """lr of the step that completes the share f of the run (step index f * N - 1)."""
    return schedule.lr(round(f * schedule.total_iterations) - 1)


@pytest.mark.parametrize("method", METHODS.names())
def test_default_schedule_has_the_same_shape_at_any_length(method):
    cfg = METHODS.get(method).config_class()
    short, long = (schedule_from_config(cfg, n, DEFAULT_LR) for n in (SHORT, LONG))
    s_short, s_long = summarize_lrs(short.curve()), summarize_lrs(long.curve())
    assert s_short["peak_lr"] == s_long["peak_lr"] == float(getattr(cfg, "lr", DEFAULT_LR))
    # warm-up ends (the peak is first reached) at the same share of the run
    assert s_short["warmup_steps"] / SHORT == pytest.approx(s_long["warmup_steps"] / LONG, abs=1 / SHORT)
    peak = s_short["peak_lr"]
    assert s_short["final_lr"] == pytest.approx(s_long["final_lr"], abs=1e-3 * peak)
    # the whole curve, normalized by the peak, sampled at the same shares of the run; the
    # tolerance is what one step of the short run can move a cosine (pi / 2 / 90 < 0.02) or a
    # warm-up of W steps whose length was rounded to whole steps (1 / W)
    tol = 0.02 + (1 / short.warmup_iterations if short.warmup_iterations else 0)
    for f in FRACTIONS:
        assert at_fraction(short, f) / peak == pytest.approx(at_fraction(long, f) / peak, abs=tol), (method, f)


def test_masked_kmeans_warmup_is_ten_percent_then_cosine():
    for n in (SHORT, LONG):
        s = schedule_from_config(MaskedKMeansConfig(), n, DEFAULT_LR)
        w = n // 10
        assert s.warmup_iterations == w
        assert s.lr(0) == pytest.approx(1e-4 / w)
        assert s.lr(w // 2 - 1) == pytest.approx(0.5e-4)  # half-way up the warm-up
        assert s.lr(w - 1) == pytest.approx(1e-4) and s.lr(w) == pytest.approx(1e-4)  # the paper's peak lr 1e-4
        assert s.lr(w + (n - w) // 2) == pytest.approx(0.5e-4)  # half-way down the cosine
        assert s.lr(n - 1) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * (n - w - 1) / (n - w))))
    assert schedule_from_config(MaskedKMeansConfig(), SHORT, DEFAULT_LR).lr(SHORT - 1) == pytest.approx(3.046e-8,
                                                                                                         rel=1e-3)
    absolute = schedule_from_config(MaskedKMeansConfig(warmup_iterations=7), SHORT, DEFAULT_LR)
    assert absolute.warmup_iterations == 7 and absolute.lr(6) == pytest.approx(1e-4)


def test_volume_fusion_halves_at_every_fifth_of_the_run():
    for n in (SHORT, LONG):
        s = schedule_from_config(VolumeFusionConfig(), n, DEFAULT_LR)
        step = n // 5  # 20k of the paper's 100k
        assert s.step_iterations == step and s.warmup_iterations == 0
        assert [s.lr(i) for i in (0, step - 1, step, 2 * step, 4 * step - 1, n - 1)] == pytest.approx(
            [1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5])
        assert summarize_lrs(s.curve())["decay_points"] == [step, 2 * step, 3 * step, 4 * step]
    absolute = schedule_from_config(VolumeFusionConfig(lr_step_iterations=20_000), SHORT, DEFAULT_LR)
    assert absolute.step_iterations == 20_000 and absolute.lr(SHORT - 1) == 1e-3  # no halving inside 100 steps


def test_warmup_not_shorter_than_the_run_is_refused():
    with pytest.raises(NnsslError, match=r"--set warmup_iterations=100.*--iterations 100"):
        schedule_from_config(MaskedKMeansConfig(warmup_iterations=100), 100, DEFAULT_LR)
    with pytest.raises(NnsslError, match="warmup_fraction=1.0 must be in"):
        schedule_from_config(MaskedKMeansConfig(warmup_fraction=1.0), 100, DEFAULT_LR)
    with pytest.raises(NnsslError, match="lr_step_fraction"):
        schedule_from_config(VolumeFusionConfig(lr_step_fraction=0.0), 100, DEFAULT_LR)
    with pytest.raises(NnsslError, match="shorter than the run"):
        LRSchedule("cosine", 1.0, 10, warmup_iterations=10)
    # a fraction never swallows the run: 2 steps with a 90 % warm-up still reach the peak at the last one
    tiny = schedule_from_config(MaskedKMeansConfig(warmup_fraction=0.9), 2, DEFAULT_LR)
    assert tiny.warmup_iterations == 1 and [tiny.lr(0), tiny.lr(1)] == [1e-4, 1e-4]


def test_cli_refuses_a_warmup_as_long_as_the_run_before_any_work(pretrain_env, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        pretrain_main(["-d", pretrain_env["dataset"], "-m", "masked_kmeans", "--iterations", "50", "--set",
                       "warmup_iterations=50", "-device", "cpu", "--num_workers", "0", "-o", str(out)])
    assert e.value.code == 2
    assert "--set warmup_iterations=50" in capsys.readouterr().err
    assert not out.exists()


def test_printed_schedule_is_the_applied_one(pretrain_env, tmp_path):
    out = pretrain(pretrain_env["dataset"], "volume_fusion", iterations=10, iterations_per_epoch=1, batch_size=2,
                   device="cpu", num_workers=0, output_folder=str(tmp_path / "vf"))
    history = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=True)["resume"]["loss_history"]
    applied = [h["lr"] for h in history]  # one step per epoch: the lr of every step
    assert applied == pytest.approx([1e-3] * 2 + [5e-4] * 2 + [2.5e-4] * 2 + [1.25e-4] * 2 + [6.25e-5] * 2)
    lines = [ln for ln in open(os.path.join(out, "training_log.txt"), encoding="utf-8") if "lr schedule (step):" in ln]
    assert len(lines) == 1
    printed = lines[0].split("lr schedule (step): ", 1)[1].strip()
    assert printed == ("10 iterations; peak lr 0.001 from iteration 0; lowered at iterations 2, 4, 6, 8; final lr "
                       "6.25e-05 (iteration 9)")


def test_summary_text_hand_computed():
    s = summarize_lrs([0.25, 0.5, 1.0, 1.0, 0.5, 0.25])
    assert s == {"length": 6, "peak_lr": 1.0, "peak_at": 2, "warmup_steps": 3, "decay_points": [4, 5],
                 "final_lr": 0.25}
    assert format_lr_summary(s, "epoch") == ("6 epochs; linear warm-up over epochs 0-2 (50% of the run); peak lr 1 "
                                             "from epoch 2; lowered at epochs 4, 5; final lr 0.25 (epoch 5)")
    cos = LRSchedule("cosine", 1.0, 100, warmup_iterations=10).describe()
    assert "continuous decay after iteration 9" in cos and re.search(r"final lr 0\.0003046 \(iteration 99\)", cos)


# --- fine-tuning trainers (epoch schedules) ---

def test_pct_net_trainer_halving_follows_the_epoch_count(pretrain_env):
    """The PCT-Net trainer's own optimizer and scheduler (built by nnU-Net's initialize): lr 1e-3 halved at
    1/6, 2/6, ... of the run (the paper's every 5k of 30k iterations), at its default length and with --epochs."""
    from nnssl.training.finetune import RunOptions, apply_run_options, build_trainer

    halvings = [1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5, 3.125e-5]
    for epochs, per_sixth in ((12, 2), (None, 20)):  # default: 30k iterations = 120 epochs of 250
        tr = build_trainer(pretrain_env["dataset"], "3d_fullres", "all", architecture="pct_net", device="cpu").trainer
        assert type(tr).__name__ == "nnsslTrainer_PCTNet"
        apply_run_options(tr, RunOptions(epochs=epochs))
        tr.initialize()
        assert tr.num_epochs == 6 * per_sixth and isinstance(tr.optimizer, torch.optim.Adam)
        lrs = []
        for e in range(tr.num_epochs):  # what nnU-Net's on_epoch_start does
            tr.lr_scheduler.step(e)
            lrs.append(tr.optimizer.param_groups[0]["lr"])
        assert lrs == pytest.approx([lr for lr in halvings for _ in range(per_sixth)])
        with open(tr.log_file, encoding="utf-8") as f:
            assert (f"nnssl: Adam lr 0.001 halved every {per_sixth} epochs (0.1667 of the {6 * per_sixth} epochs)"
                    in f.read())


def test_logonet_warmup_is_shorter_than_any_run():
    assert [warmup_epochs_for(n) for n in (1, 2, 5, 1000)] == [0, 1, 1, 50]


class _FakeTrainer:
    """Just what FinetuneOptionsMixin.initialize touches: nnU-Net's initialize sets optimizer + scheduler."""

    def __init__(self, num_epochs, warmup):
        self.num_epochs, self.current_epoch, self.nnssl_warmup_epochs, self.logged = num_epochs, 0, warmup, []

    def initialize(self):
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self.lr_scheduler = EpochStepLR(self.optimizer, 0.1, 2)

    def print_to_log_file(self, *args):
        self.logged.append(" ".join(map(str, args)))


class _Trainer(FinetuneOptionsMixin, _FakeTrainer):
    pass


def test_finetune_warmup_printed_as_applied_and_refused_when_too_long():
    tr = _Trainer(num_epochs=6, warmup=2)
    tr.initialize()
    applied = []
    for e in range(6):
        tr.lr_scheduler.step(e)
        applied.append(tr.optimizer.param_groups[0]["lr"])
    # step 0.1 halved every 2 epochs, times the warm-up factors 1/2, 2/2
    assert applied == pytest.approx([0.05, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert tr.logged == ["nnssl: lr schedule (the lr at the start of each epoch): 6 epochs; linear warm-up over "
                         "epochs 0-1 (33.3% of the run); peak lr 0.1 from epoch 1; lowered at epochs 2, 4; final lr "
                         "0.025 (epoch 5)"]
    with pytest.raises(NnsslError, match=r"--warmup_epochs 3 is not shorter than the run \(--epochs 3\)"):
        _Trainer(num_epochs=3, warmup=3).initialize()
