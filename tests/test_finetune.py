"""nnssl_train: refusals, weight injection into real trainers, Volume Fusion -> fine-tuning, PCT-Net's
trainer, and stock nnU-Net accepting nnssl's pretraining checkpoint.

Data: conftest's session-wide ``pretrain_tree`` (2 training cases, tiny presets, every
architecture planned); 2 cases allow only fold 'all'.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nnssl.checkpoints import checkpoint_metadata, save_pretraining_checkpoint
from nnssl.errors import NnsslError
from nnssl.training.finetune import RunOptions, apply_run_options, build_trainer, train
from nnssl.training.injection import inject_pretrained
from nnssl.training.trainer_lookup import find_trainer_class

DS = "Dataset001_Blobs"
TINY = dict(epochs=1, iterations_per_epoch=2, val_iterations=1, device="cpu")


@pytest.fixture(scope="module")
def vf_checkpoint(pretrain_tree, tmp_path_factory):
    """A Volume Fusion pretraining of plainconvunet (2 iterations) by the real engine."""
    from nnssl.training.pretrainer import pretrain

    out = tmp_path_factory.mktemp("vf")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed"):
            mp.setenv(var, pretrain_tree[var])
        mp.setenv("nnUNet_results", str(out / "results"))
        folder = pretrain(DS, "volume_fusion", iterations=2, iterations_per_epoch=2, batch_size=2, device="cpu",
                          num_workers=0, output_folder=str(out / "pretraining"))
    return os.path.join(folder, "checkpoint_final.pth")


def unet_tensor_counts(arch_kwargs):
    """Hand count of a PlainConvUNet's distinct tensors: each conv has weight + bias and is
    followed by an affine InstanceNorm (weight + bias) -> 4 per conv; a transposed conv and an
    output conv have 2 each."""
    n = arch_kwargs["n_stages"]
    return {"encoder": 4 * sum(arch_kwargs["n_conv_per_stage"]),
            "decoder": 4 * sum(arch_kwargs["n_conv_per_stage_decoder"]) + 2 * (n - 1),
            "heads": 2 * (n - 1)}


def test_refusals_before_any_training(pretrain_env, tmp_path):
    with pytest.raises(NnsslError, match="too few for nnU-Net's 5-fold"):
        train(DS, "3d_fullres", 0, **TINY)
    with pytest.raises(NnsslError, match="no checkpoint to continue from"):
        train(DS, "3d_fullres", "all", continue_training=True, **TINY)
    with pytest.raises(NnsslError, match="--val needs a finished training"):
        train(DS, "3d_fullres", "all", validation_only=True, **TINY)
    assert not os.listdir(pretrain_env["nnUNet_results"])  # refused before nnU-Net created any folder
    with pytest.raises(NnsslError, match="-pretrained only applies to a fresh start"):
        train(DS, "3d_fullres", "all", continue_training=True, pretrained=__file__, **TINY)
    with pytest.raises(NnsslError, match="does not exist"):
        train(DS, "3d_fullres", "all", pretrained=str(tmp_path / "nothing.pth"), **TINY)
    with pytest.raises(NnsslError, match="nnssl_plan_and_preprocess"):
        train(DS, "3d_fullres", "all", plans="nnUNetPlansNotThere", **TINY)
    with pytest.raises(NnsslError, match="need an nnssl trainer"):
        train(DS, "3d_fullres", "all", trainer="nnUNetTrainer", warmup_epochs=2, **TINY)


def test_trainer_lookup(monkeypatch):
    assert find_trainer_class("nnsslTrainer").__name__ == "nnsslTrainer"
    assert find_trainer_class("nnUNetTrainer").__module__ == "nnunetv2.training.nnUNetTrainer.nnUNetTrainer"
    # Other names go through nnU-Net's folder search; whether it fails on a broken optional
    # dependency (as torchvision on this machine) or finds nothing, the user gets an NnsslError.
    with pytest.raises(NnsslError, match="(?i)trainer \\(-tr\\) 'nnUNetTrainer_NoSuchName'"):
        find_trainer_class("nnUNetTrainer_NoSuchName")
    import nnunetv2.utilities.find_objects as find_objects

    def not_found(name):
        raise RuntimeError(f"Could not find requested nnunet trainer {name} in nnunetv2.training.nnUNetTrainer")

    monkeypatch.setattr(find_objects, "recursive_find_trainer_class_by_name", not_found)
    with pytest.raises(NnsslError, match="found neither among nnssl's trainers.*nnUNet_extTrainer"):
        find_trainer_class("nnUNetTrainer_NoSuchName")


CRAWL = r'''
import json, sys
import matplotlib
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401  (every trainer module needs it anyway)
before, backend = set(sys.modules), matplotlib.get_backend()
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
folder, name = sys.argv[1:3]
# what nnU-Net's recursive_find_trainer_class_by_name does with each nnUNet_extTrainer folder
cls = recursive_find_python_class(folder, name, None, base_folder=folder, verbose=False,
                                  cleanup_imports_from_base_folder=True)
print("RESULT " + json.dumps({"found": cls and f"{cls.__module__}.{cls.__name__}",
                              "new": sorted(set(sys.modules) - before), "backend": [backend, matplotlib.get_backend()]}))
'''
# What a folder in nnUNet_extTrainer must not pull in: the pretraining engine, methods, planning, plotting.
CRAWL_FORBIDDEN = ("nnssl.training.pretrain", "nnssl.training.progress", "nnssl.training.pretext_preview",
                   "nnssl.ssl", "nnssl.planning", "nnssl.cli", "nnssl.demo", "nnssl.inference", "nnssl.evaluation",
                   "matplotlib.pyplot")


def test_nnunet_trainer_crawl_imports_only_trainers(tmp_path):
    """The README's nnUNet_extTrainer command names nnssl's trainer folder; nnU-Net's crawl of it (every
    module, as for a name it does not hold) imports no pretraining engine and switches no matplotlib
    backend, and finds nnssl's trainer by name."""
    from nnssl.training.trainer_lookup import nnssl_trainer_folder

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    command = readme.split("export nnUNet_extTrainer=$(", 1)[1].split(")\n", 1)[0]
    assert command.startswith("python -c ")
    folder = subprocess.run([sys.executable, "-c", command[len("python -c "):].strip().strip('"')],
                            capture_output=True, text=True, encoding="utf-8", check=True).stdout.strip()
    assert folder == nnssl_trainer_folder()
    script = tmp_path / "crawl.py"
    script.write_text(CRAWL, encoding="utf-8")
    results = {}
    for name in ("nnUNetTrainer_NotHere", "nnsslTrainer"):
        r = subprocess.run([sys.executable, str(script), folder, name], capture_output=True, text=True, encoding="utf-8", timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        results[name] = json.loads(next(li for li in r.stdout.splitlines() if li.startswith("RESULT "))[7:])
    crawl = results["nnUNetTrainer_NotHere"]
    assert crawl["found"] is None
    assert [m for m in crawl["new"] if m.startswith(CRAWL_FORBIDDEN)] == []
    assert crawl["backend"][0] == crawl["backend"][1]
    assert results["nnsslTrainer"]["found"].endswith(".nnsslTrainer")


def test_run_options_on_resume_keep_saved_values_unless_given():
    saved = {"epochs": 5, "iterations_per_epoch": 3, "val_iterations": 1, "warmup_epochs": 2,
             "freeze_encoder_epochs": None}
    merged = RunOptions(epochs=8).merged_over(saved)
    assert (merged.epochs, merged.iterations_per_epoch, merged.warmup_epochs) == (8, 3, 2)


def test_checkpoints_that_do_not_fit_are_refused(pretrain_env, vf_checkpoint, tmp_path, monkeypatch):
    run = build_trainer(DS, "3d_fullres", "all", device="cpu")
    tr = run.trainer
    tr.initialize()
    base = torch.load(vf_checkpoint, weights_only=True)

    def variant(name, **changes):
        ckpt = json.loads(json.dumps({k: v for k, v in base.items() if k not in ("network_weights", "resume")}))
        for key, value in changes.items():
            *path, last = key.split("/")
            d = ckpt
            for p in path:
                d = d[p]
            d[last] = value
        ckpt["network_weights"] = base["network_weights"]
        torch.save(ckpt, tmp_path / name)
        return str(tmp_path / name)

    resenc = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    with pytest.raises(NnsslError, match="architecture class: checkpoint .*ResidualEncoderUNet"):
        inject_pretrained(tr, variant("arch.pth", **{"architecture/network_class_name": resenc}))
    with pytest.raises(NnsslError, match=r"has 1 input channel\(s\) but the checkpoint was pretrained with 2"):
        inject_pretrained(tr, variant("channels.pth", input_channels=2))
    wider = list(base["architecture"]["arch_kwargs"]["features_per_stage"])
    wider[-1] *= 2
    with pytest.raises(NnsslError, match=r"arch_kwargs\['features_per_stage'\]"):
        inject_pretrained(tr, variant("kwargs.pth", **{"architecture/arch_kwargs/features_per_stage": wider}))
    stock = tmp_path / "stock.pth"  # an nnU-Net training checkpoint is not an nnssl pretraining checkpoint
    torch.save({"network_weights": base["network_weights"]}, stock)
    with pytest.raises(NnsslError, match="not an nnssl pretraining checkpoint"):
        inject_pretrained(tr, str(stock))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(NnsslError, match="cannot be loaded"):
        inject_pretrained(tr, str(tmp_path / "junk.pth"))
    # Plans that preprocess differently (same network): refused with every difference and the flag.
    spacing = [s * 2 for s in base["normalization"]["spacing"]]
    stats = base["normalization"]["foreground_intensity_properties_per_channel"]
    p995 = stats["0"]["percentile_99_5"] + 100
    other_plans = variant("plans.pth", **{"normalization/spacing": spacing, "plans_name": "nnUNetPlansOther",
                                          "normalization/foreground_intensity_properties_per_channel/0/"
                                          "percentile_99_5": p995})
    with pytest.raises(NnsslError) as e:
        inject_pretrained(tr, other_plans)
    msg = str(e.value)
    assert f"spacing: checkpoint {spacing!r}" in msg and f"channel 0 intensity percentile_99_5: checkpoint {p995!r}" in msg
    assert "--allow_plans_mismatch" in msg and "plans_name: checkpoint 'nnUNetPlansOther'" in msg  # harmless, listed
    # nnUNetPlansOther does not exist for this dataset, and its nnUNetPlans do not match: the hint says how to plan
    assert "-p nnUNetPlansOther" not in msg
    assert f"write some with `nnssl_plan_and_preprocess -d {DS} --like {other_plans}`" in msg
    # ... and plans of this dataset that preprocess like the checkpoint are named
    pp = tmp_path / "pp" / DS
    pp.mkdir(parents=True)
    with open(os.path.join(pretrain_env["nnUNet_preprocessed"], DS, "nnUNetPlans.json"), encoding="utf-8") as f:
        coarse = json.load(f)
    coarse["plans_name"] = "nnUNetPlansCoarse"
    coarse["configurations"]["3d_fullres"]["spacing"] = spacing
    (pp / "nnUNetPlansCoarse.json").write_text(json.dumps(coarse), encoding="utf-8")
    (pp / "dataset.json").write_text("{}", encoding="utf-8")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pp"))
    with pytest.raises(NnsslError, match=rf"Fine-tune with {DS}'s plans that match it \(-p nnUNetPlansCoarse\)"):
        inject_pretrained(tr, variant("coarse.pth", **{"normalization/spacing": spacing}))
    monkeypatch.setenv("nnUNet_preprocessed", pretrain_env["nnUNet_preprocessed"])
    assert not os.path.exists(os.path.join(run.fold_dir, "nnssl_pretrained.json"))

    report = inject_pretrained(tr, other_plans, allow_plans_mismatch=True)
    assert report.n_loaded > 0
    record = json.load(open(os.path.join(run.fold_dir, "nnssl_pretrained.json"), encoding="utf-8"))["plans_differences"]
    assert record["allowed"] and len(record["refused"]) == 2 and record["harmless"] == [
        "plans_name: checkpoint 'nnUNetPlansOther', fine-tuning 'nnUNetPlans'"]
    # A harmless difference alone is reported, not refused.
    inject_pretrained(tr, variant("name.pth", plans_name="nnUNetPlansOther"))
    record = json.load(open(os.path.join(run.fold_dir, "nnssl_pretrained.json"), encoding="utf-8"))["plans_differences"]
    assert record == {"refused": [], "harmless": record["harmless"], "allowed": False} and len(record["harmless"]) == 1


def test_volume_fusion_to_finetuning_with_frozen_encoder(pretrain_env, vf_checkpoint):
    out = train(DS, "3d_fullres", "all", pretrained=vf_checkpoint, freeze_encoder_epochs=1, **TINY)
    fold = out["output_folder"]
    assert fold.endswith(os.path.join(DS, "nnsslTrainer__nnUNetPlans__3d_fullres", "fold_all"))
    for name in ("checkpoint_final.pth", "progress.png", "validation/summary.json", "nnssl_training_options.json"):
        assert os.path.isfile(os.path.join(fold, name)), name

    pre = torch.load(vf_checkpoint, weights_only=True)
    counts = unet_tensor_counts(pre["architecture"]["arch_kwargs"])
    record = json.load(open(os.path.join(fold, "nnssl_pretrained.json"), encoding="utf-8"))
    assert record["sha256"] == hashlib.sha256(open(vf_checkpoint, "rb").read()).hexdigest()
    assert (record["method"], record["iteration"]) == ("volume_fusion", 2)
    c = record["report"]["counts"]
    assert c["loaded"] == counts["encoder"] + counts["decoder"]
    assert c["left_random"] == c["output_head"] == counts["heads"]
    assert record["report"]["by_prefix"]["encoder.stages"]["loaded"] == counts["encoder"]
    log = "".join(open(os.path.join(fold, f), encoding="utf-8").read() for f in os.listdir(fold) if f.startswith("training_log"))
    assert "loaded %d of %d tensors" % (c["loaded"], c["total"]) in log and "encoder frozen" in log

    final = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)["network_weights"]
    enc = [k for k in pre["network_weights"] if k.startswith("encoder.")]
    dec = [k for k in pre["network_weights"] if k.startswith("decoder.stages.")]
    # The encoder was frozen for the only epoch: still exactly the pretrained weights; the decoder trained.
    assert all(torch.equal(final[k], pre["network_weights"][k]) for k in enc)
    assert any(not torch.equal(final[k], pre["network_weights"][k]) for k in dec)


def test_stock_nnunet_loader_accepts_the_checkpoint(pretrain_env, vf_checkpoint):
    """nnU-Net's own -pretrained_weights loader: every non-head key present with the right shape."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    tr = build_trainer(DS, "3d_fullres", "all", trainer="nnUNetTrainer", device="cpu").trainer
    tr.initialize()
    load_pretrained_weights(tr.network, vf_checkpoint)
    pre = torch.load(vf_checkpoint, weights_only=True)["network_weights"]
    state = tr.network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pre.items())


TINY_STOCK_TRAINER = '''
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_nnsslTestTiny(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1

    def perform_actual_validation(self, save_probabilities=False):
        pass  # not what this test is about, and the slowest part of a tiny run
'''


def test_stock_nnunetv2_train_with_pretrained_weights(pretrain_env, vf_checkpoint, tmp_path):
    """``nnUNetv2_train -pretrained_weights <nnssl checkpoint>`` as a user would run it (test-only
    environment: a stand-in torchvision, see test_predict, and a tiny trainer for speed)."""
    from test_predict import stock_nnunet_env

    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "tiny_trainer.py").write_text(TINY_STOCK_TRAINER, encoding="utf-8")
    env = stock_nnunet_env(tmp_path, ext_trainer_folder=str(ext))
    cmd = [shutil.which("nnUNetv2_train"), DS, "3d_fullres", "all", "-tr", "nnUNetTrainer_nnsslTestTiny",
           "-pretrained_weights", vf_checkpoint, "-device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Loading pretrained weights from file" in r.stdout
    fold = os.path.join(pretrain_env["nnUNet_results"], DS, "nnUNetTrainer_nnsslTestTiny__nnUNetPlans__3d_fullres",
                        "fold_all")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))


def test_pct_net_trainer_with_warmup(pretrain_env):
    # nnU-Net's training loop only (train() would add the final sliding-window validation).
    run = build_trainer(DS, "3d_fullres", "all", architecture="pct_net", device="cpu")
    apply_run_options(run.trainer, RunOptions(epochs=3, iterations_per_epoch=1, val_iterations=1, warmup_epochs=2))
    run.trainer.run_training()
    assert os.path.basename(os.path.dirname(run.fold_dir)) == "nnsslTrainer_PCTNet__nnsslPCTNetPlans__3d_fullres"
    ckpt = torch.load(os.path.join(run.fold_dir, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["trainer_name"] == "nnsslTrainer_PCTNet"
    assert ckpt["logging"]["lrs"][0] == pytest.approx(1e-3 * 1 / 2)  # Adam lr 1e-3, warm-up epoch 0 of 2
    assert ckpt["optimizer_state"]["param_groups"][0]["weight_decay"] == 1e-5


def test_cli_turns_user_errors_into_exit_code_2(pretrain_env, capsys):
    from nnssl.cli.train import main

    with pytest.raises(SystemExit) as e:
        main([DS, "3d_fullres", "all", "--c", "-device", "cpu"])
    assert e.value.code == 2
    assert "no checkpoint to continue from" in capsys.readouterr().err


def test_cli_passes_allow_plans_mismatch(monkeypatch):
    import nnssl.training.finetune as finetune
    from nnssl.cli.train import main

    seen = {}
    monkeypatch.setattr(finetune, "train", lambda *a, **kw: seen.update(kw) or {"output_folder": "x"})
    for argv, expected in (([], False), (["--allow_plans_mismatch"], True)):
        with pytest.raises(SystemExit) as e:
            main([DS, "3d_fullres", "all", "-pretrained", "ckpt.pth", *argv])
        assert e.value.code == 0 and seen["allow_plans_mismatch"] is expected


def test_fold_range_and_retraining_a_finished_fold_is_announced(pretrain_env, monkeypatch, capsys):
    from nnssl.training import finetune

    with pytest.raises(NnsslError, match="Fold '7': fold must be 0–4 or all"):
        train(DS, "3d_fullres", 7, **TINY)
    with pytest.raises(NnsslError, match="Fold '-1': fold must be 0–4 or all"):
        train(DS, "3d_fullres", -1, **TINY)
    fold_dir = finetune.fold_folder(DS, "nnsslTrainer", "nnUNetPlans", "3d_fullres", "all")
    os.makedirs(fold_dir)
    open(os.path.join(fold_dir, "checkpoint_final.pth"), "wb").close()  # a finished fold

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(finetune, "build_trainer", stop)  # the line must come before the trainer starts
    with pytest.raises(Stop):
        train(DS, "3d_fullres", "all", **TINY)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"overwrites {os.path.join(fold_dir, 'checkpoint_final.pth')}" in out
    assert "fold all is already trained" in out and "--c continues it" in out
