"""Foundation-model mode: generic planning of an unlabeled pool, plans "like" a checkpoint, model
archives, channel adaptation (planning/generic.py, planning/like.py, nnssl/checkpoints/archive.py,
nnssl/training/channel_adaptation.py)."""
import json
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_blob_case, write_image, write_raw_dataset
from nnssl.errors import NnsslError

POOL = "Dataset002_Pool"


def write_pool(raw_root, n=5, shape=(16, 32, 32), seed=7):
    """An unlabeled raw dataset (imagesTr only, marked unlabeled), spacing 0.8 x 0.8 x 3 mm."""
    rng = np.random.default_rng(seed)
    root = os.path.join(raw_root, POOL)
    os.makedirs(os.path.join(root, "imagesTr"))
    for i in range(n):
        image, _ = make_blob_case(rng, shape)
        write_image(os.path.join(root, "imagesTr", f"pool_{i:03d}_0000.nii.gz"), image, (0.8, 0.8, 3.0))
    with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": n,
                   "file_ending": ".nii.gz", "nnssl_unlabeled": True}, f)


@pytest.fixture(scope="module")
def foundation(tmp_path_factory):
    """Pool planned generically and pretrained (2 iterations), exported; Blobs planned like it."""
    from nnssl.planning.api import plan_and_preprocess
    from nnssl.checkpoints import export_pretrained
    from nnssl.training.pretrainer import pretrain

    root = tmp_path_factory.mktemp("foundation")
    env = {var: str(root / sub) for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pp"),
                                                ("nnUNet_results", "results"))}
    with pytest.MonkeyPatch.context() as mp:
        for var, folder in env.items():
            os.makedirs(folder)
            mp.setenv(var, folder)
        mp.setenv("nnUNet_n_proc_DA", "1")
        write_pool(env["nnUNet_raw"])
        write_raw_dataset(env["nnUNet_raw"], n_train=3, n_test=1, shape=(16, 32, 32))
        generic = plan_and_preprocess(POOL, generic=True, preset="tiny", num_processes=1, show_progress=False)
        out = pretrain(POOL, "volume_fusion", iterations=2, iterations_per_epoch=2, batch_size=2, device="cpu",
                       num_workers=0)
        ckpt = os.path.join(out, "checkpoint_final.pth")
        archive = str(root / "model.zip")
        card = export_pretrained(ckpt, archive)
        like = plan_and_preprocess("Blobs", like=archive, num_processes=1, show_progress=False)
        yield {**env, "root": root, "generic": generic, "ckpt": ckpt, "archive": archive, "card": card,
               "like": like}


def test_window_statistics_make_nnunets_ct_normalization_a_window(foundation):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    with open(foundation["generic"]["plans"]["plainconvunet"], encoding="utf-8") as f:
        plans = json.load(f)
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=props)
    x = np.array([-3000, -1000, -500, 0, 250, 1000, 2500], dtype=np.float32)
    np.testing.assert_allclose(norm.run(x.copy()), [-1, -1, -0.5, 0, 0.25, 1, 1], atol=1e-6)


def test_generic_fingerprint_uses_the_body_not_labels(foundation):
    with open(os.path.join(foundation["nnUNet_preprocessed"], POOL, "dataset_fingerprint.json"), encoding="utf-8") as f:
        fp = json.load(f)
    stats = fp["foreground_intensity_properties_per_channel"]["0"]
    # body = above -500 HU: air (-1000) never counts; the blob phantoms' body is 40 HU +- noise, organs 140-220
    assert stats["min"] > -500 and 0 < stats["median"] < 250
    assert fp["nnssl_generic"]["num_cases"] == 5 and len(fp["spacings"]) == 5


def test_generic_checkpoint_records_the_pool_cases_it_was_pretrained_on(foundation):
    import hashlib

    names = [f"pool_{i:03d}" for i in range(5)]
    with open(os.path.join(os.path.dirname(foundation["ckpt"]), "config.json"), encoding="utf-8") as f:
        assert json.load(f)["pretraining_cases"] == names
    ckpt = torch.load(foundation["ckpt"], weights_only=True)
    assert ckpt["pretraining_cases_count"] == 5
    assert ckpt["pretraining_cases_sha256"] == hashlib.sha256("\n".join(names).encode()).hexdigest()


def test_like_plans_carry_the_checkpoints_spacing_normalization_and_network(foundation):
    ckpt = torch.load(foundation["ckpt"], weights_only=True)
    with open(foundation["like"]["plans"]["like"], encoding="utf-8") as f:
        plans = json.load(f)
    cfg = plans["configurations"]["3d_fullres"]
    norm = ckpt["normalization"]
    assert cfg["spacing"] == norm["spacing"] and cfg["patch_size"] == norm["patch_size"]
    assert cfg["normalization_schemes"] == norm["normalization_schemes"]
    assert plans["foreground_intensity_properties_per_channel"] == norm["foreground_intensity_properties_per_channel"]
    assert plans["transpose_forward"] == norm["transpose_forward"]
    assert cfg["architecture"]["arch_kwargs"] == ckpt["architecture"]["arch_kwargs"]
    assert plans["plans_name"].startswith("nnsslLike_plainconvunet_") and cfg["data_identifier"].startswith(
        plans["plans_name"])
    assert plans["nnssl_like"]["sha256"] == foundation["card"]["sha256"]


def test_finetune_like_then_nnssl_and_stock_predict_agree(foundation, tmp_path, monkeypatch):
    from test_predict import stock_nnunet_env

    from nnssl.inference.predict import predict
    from nnssl.training.finetune import train

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, foundation[var])
    plans_name = os.path.basename(foundation["like"]["plans"]["like"])[:-5]
    train("Blobs", "3d_fullres", "all", plans=plans_name, pretrained=foundation["archive"], device="cpu",
          epochs=1, iterations_per_epoch=2, val_iterations=1)
    fold = os.path.join(foundation["nnUNet_results"], "Dataset001_Blobs", f"nnsslTrainer__{plans_name}__3d_fullres",
                        "fold_all")
    with open(os.path.join(fold, "nnssl_pretrained.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["plans_differences"]["refused"] == []
    assert report["report"]["counts"]["loaded"] > 0 and report["report"]["counts"]["skipped_shape_mismatch"] == 0
    images = os.path.join(foundation["nnUNet_raw"], "Dataset001_Blobs", "imagesTs")
    predict(images, str(tmp_path / "nnssl"), "Blobs", "3d_fullres", ["all"], plans=plans_name, device="cpu",
            disable_tta=True, npp=0, nps=0)
    env = stock_nnunet_env(tmp_path)
    r = subprocess.run([shutil.which("nnUNetv2_predict"), "-i", images, "-o", str(tmp_path / "stock"), "-d",
                        "Dataset001_Blobs", "-c", "3d_fullres", "-f", "all", "-tr", "nnsslTrainer", "-p", plans_name,
                        "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                       env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    case = sorted(f for f in os.listdir(tmp_path / "stock") if f.endswith(".nii.gz"))[0]
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nnssl" / case)))
    stock = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "stock" / case)))
    np.testing.assert_array_equal(ours, stock)


def test_archive_round_trip_is_bit_exact_and_tampering_is_refused(foundation, tmp_path):
    from nnssl.checkpoints import load_pretraining_checkpoint

    original = torch.load(foundation["ckpt"], weights_only=True)
    loaded = load_pretraining_checkpoint(foundation["archive"])
    # plainconvunet: the archive's checkpoint also carries nnU-Net master's nnssl_adaptation_plan
    assert loaded.keys() == set(original) - {"resume"} | {"nnssl_adaptation_plan", "citations"}
    for k, v in original["network_weights"].items():
        assert torch.equal(v, loaded["network_weights"][k]), k
    with zipfile.ZipFile(foundation["archive"]) as z:
        members = {n: z.read(n) for n in z.namelist()}
    card = json.loads(members["model_card.json"])
    assert card["method"] == "volume_fusion" and card["num_volumes"] == 5 and card["iterations"] == 2

    tampered = bytearray(members["checkpoint_final.pth"])
    tampered[len(tampered) // 2] ^= 0xFF
    for name, content in (("tampered.zip", {**members, "checkpoint_final.pth": bytes(tampered)}),
                          ("no_card.zip", {k: v for k, v in members.items() if k != "model_card.json"})):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for member, data in content.items():
                z.writestr(member, data)
        with pytest.raises(NnsslError, match="sha256|lacks model_card.json"):
            load_pretraining_checkpoint(str(tmp_path / name))


def test_channel_adaptation_equals_the_pretrained_network_on_a_repeated_input():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnssl.training.channel_adaptation import adapt_input_channels

    def unet(channels):
        torch.manual_seed(0)
        return PlainConvUNet(channels, 2, (4, 8), torch.nn.Conv3d, 3, (1, 2), 1, 2, (1,), norm_op=torch.nn.InstanceNorm3d,
                             nonlin=torch.nn.ReLU).eval()

    one, three = unet(1), unet(3)
    weights, names = adapt_input_channels(one.state_dict(), three.state_dict(), 1, 3)
    assert names and all(n.endswith(("stages.0.0.convs.0.conv.weight", "stages.0.0.convs.0.all_modules.0.weight"))
                         for n in names)
    three.load_state_dict(weights)
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(three(x.repeat(1, 3, 1, 1, 1)), one(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(NnsslError, match="multiple of the checkpoint's"):
        adapt_input_channels(three.state_dict(), one.state_dict(), 3, 1)


def test_bad_input(foundation, monkeypatch, tmp_path):
    from nnssl.planning.api import plan_and_preprocess
    from nnssl.planning.generic import check_volumes_fit, window_intensity_properties

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, foundation[var])
    with pytest.raises(NnsslError, match="add --generic"):
        plan_and_preprocess(POOL, spacing=["median"])
    with pytest.raises(NnsslError, match="does not fit .*divisible by"):
        plan_and_preprocess(POOL, generic=True, preset="tiny", patch=(16, 30, 32), no_pp=True, show_progress=False)
    with pytest.raises(NnsslError, match="upper bound"):
        window_intensity_properties(1000, -1000)
    fp = {"shapes_after_crop": [[16, 32, 32], [20, 30, 30]], "spacings": [[3.0, 0.8, 0.8]] * 2}
    with pytest.raises(NnsslError, match="smaller than the patch"):
        check_volumes_fit(fp, [3.0, 0.8, 0.8], [24, 32, 32], [0, 1, 2], POOL)
    check_volumes_fit(fp, [3.0, 0.8, 0.8], [16, 32, 32], [0, 1, 2], POOL)  # one volume fits
    with pytest.raises(NnsslError, match="must end in .zip"):
        from nnssl.checkpoints import export_pretrained
        export_pretrained(foundation["ckpt"], str(tmp_path / "model.tar"))
