"""nnssl_demo: its fine-tuning runs are paired (same batches), and its closing messages: the pictures it
lists exist, a worse pretrained start is said plainly, a tie is "no difference", and one seed is never
sold as a measurement.

(The whole demo is run by hand / in the benchmarks: ``nnssl_demo --fast``; the message tests use a
hand-made output folder so that they take milliseconds; the pairing test fine-tunes the shared tiny
``pretrain_tree`` for 3 iterations per run.)
"""
import dataclasses
import hashlib
import json
import os
import re

from nnssl.demo import FAST, existing_pictures, finetune, pictures_message, verdict

BENCHMARK = "nnssl_benchmark_ssl -m volume_fusion --seeds 0 1 2 3 4"


def _run_folder(root, label, dice, with_progress=True):
    fold = os.path.join(root, "runs", label, "nnUNet_results", "Dataset001_BTCV", "T__P__3d_fullres", "fold_all")
    os.makedirs(fold)
    if with_progress:
        open(os.path.join(fold, "progress.png"), "wb").close()
    pred = os.path.join(root, "runs", label, "test_predictions")
    os.makedirs(pred)
    with open(os.path.join(pred, "nnssl_run.json"), "w", encoding="utf-8") as f:
        json.dump({"fold_dir": fold}, f)
    with open(os.path.join(pred, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"foreground_mean": {"Dice": dice}}, f)
    return pred


def test_final_message_lists_existing_pictures_only(tmp_path):
    root = str(tmp_path)
    for name in ("report.png", "pretext.png"):
        open(os.path.join(root, name), "wb").close()
    runs = [_run_folder(root, "scratch", 0.3), _run_folder(root, "volume_fusion", 0.2, with_progress=False)]
    message = pictures_message(root, runs)
    listed = re.findall(r"^  (/\S+\.png)$", message, flags=re.M)
    # report, pretext and the scratch run's progress.png exist; the pretrained run's and the
    # pretraining's progress.png do not, so they are not listed.
    assert sorted(listed) == sorted([os.path.join(root, "report.png"), os.path.join(root, "pretext.png"),
                                     os.path.join(os.path.dirname(runs[0]), "nnUNet_results", "Dataset001_BTCV",
                                                  "T__P__3d_fullres", "fold_all", "progress.png")])
    assert all(os.path.isfile(p) for p in listed)
    assert len(existing_pictures(root, runs)) == 3
    # every listed picture is followed by one sentence saying what it shows
    assert len(re.findall(r"^      \S.*\.$", message, flags=re.M)) == 3


def test_verdict_says_worse_plainly(tmp_path):
    runs = [_run_folder(str(tmp_path), "scratch", 0.30), _run_folder(str(tmp_path), "volume_fusion", 0.25)]
    text = verdict(runs, "volume_fusion", seed=3)
    assert "WORSE than scratch" in text and "0.250 vs 0.300" in text and "-0.050" in text
    assert "One seed cannot tell a difference of this size (0.050 Dice) from seed-to-seed noise" in text
    assert "this is seed 3" in text and text.endswith(BENCHMARK)
    runs = [_run_folder(str(tmp_path / "b"), "scratch", 0.30), _run_folder(str(tmp_path / "b"), "vf", 0.35)]
    text = verdict(runs, "vf")
    assert "better than scratch" in text and "(+0.050)" in text
    assert "cannot tell a difference of this size (0.050 Dice)" in text
    assert text.endswith("nnssl_benchmark_ssl -m vf --seeds 0 1 2 3 4")


def test_verdict_calls_a_zero_difference_no_difference(tmp_path):
    runs = [_run_folder(str(tmp_path), "scratch", 0.412), _run_folder(str(tmp_path), "volume_fusion", 0.412)]
    text = verdict(runs, "volume_fusion")
    assert text.startswith("No difference: the volume_fusion-pretrained start and scratch reach the same test mean "
                           "Dice here (0.412 vs 0.412).")
    assert "better" not in text and "WORSE" not in text and "+0.000" not in text
    assert "one seed tell a difference smaller than the seed-to-seed noise from none" in text
    assert text.endswith(BENCHMARK)
    # below the printed precision is a tie too; one step above it is not
    runs = [_run_folder(str(tmp_path / "b"), "scratch", 0.4120), _run_folder(str(tmp_path / "b"), "vf", 0.4124)]
    assert verdict(runs, "vf").startswith("No difference")
    runs = [_run_folder(str(tmp_path / "c"), "scratch", 0.412), _run_folder(str(tmp_path / "c"), "vf", 0.413)]
    assert "better than scratch" in verdict(runs, "vf")


def test_scratch_and_pretrained_runs_see_the_same_batches(pretrain_env, tmp_path, monkeypatch):
    """The demo seeds every generator before each fine-tuning run: the scratch run and the pretrained run
    get the same training batches (images and labels after augmentation)."""
    from nnssl.training.pretrainer import pretrain
    from nnssl.training.trainer_lookup import find_trainer_class

    s = dataclasses.replace(FAST, finetune_epochs=1, iterations_per_epoch=3, seed=5)
    trainer_cls = find_trainer_class(s.trainer)
    hashes, original = [], trainer_cls.train_step

    def recording_train_step(self, batch):
        h = hashlib.sha256(batch["data"].numpy().tobytes())
        h.update(batch["target"][0].numpy().tobytes())
        hashes.append(h.hexdigest())
        return original(self, batch)

    monkeypatch.setattr(trainer_cls, "train_step", recording_train_step)
    for var in ("nnUNet_results", "nnUNet_n_proc_DA"):  # finetune sets them; restored after the test
        monkeypatch.setenv(var, os.environ.get(var, ""))
    ckpt = os.path.join(pretrain("Dataset001_Blobs", s.method, s.architecture, iterations=1, iterations_per_epoch=1,
                                 batch_size=2, device="cpu", num_workers=0, output_folder=str(tmp_path / "pre")),
                        "checkpoint_final.pth")
    finetune(s, str(tmp_path / "scratch"), None, dataset="Dataset001_Blobs")
    scratch, hashes[:] = list(hashes), []
    finetune(s, str(tmp_path / "pretrained"), ckpt, dataset="Dataset001_Blobs")
    assert len(scratch) == 3 and len(set(scratch)) == 3  # three different batches ...
    assert hashes == scratch  # ... and the same three in both runs
