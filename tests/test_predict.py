"""nnssl_predict end to end (plan -> Volume Fusion pretraining -> fine-tuning -> prediction), the
output folder's geometry, stock ``nnUNetv2_predict`` on the same result folder, and bad inputs.

Stock nnU-Net looks trainer classes up by crawling its trainer folder, which imports timm and
through it torchvision. On a normal install it imports fine; where the installed torchvision
does not match torch and fails to import (as on the development machine), the stock-compatibility
tests put a TEST-ONLY stand-in torchvision on PYTHONPATH (``stock_nnunet_env``), and only then;
nothing nnssl writes depends on it.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_image
from nnssl.errors import NnsslError
from nnssl.inference.predict import STAGING, collect_cases, predict
from nnssl.training.trainer_lookup import nnssl_trainer_folder

DS = "Dataset001_Blobs"

FAKE_TORCHVISION = '''"""TEST-ONLY stand-in for torchvision: every submodule and attribute is a harmless stub class."""
import importlib.abc
import importlib.machinery
import sys
import types


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(name)


def _stub(name):
    return _StubMeta(name, (), {"__init__": lambda self, *a, **k: None})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(name)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
__version__ = "0.0.0"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _stub(name)
'''


def real_torchvision_imports() -> bool:
    """Whether the installed torchvision imports (in a fresh interpreter: a failed import leaves
    half-initialized modules behind)."""
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def stock_nnunet_env(tmp_path, ext_trainer_folder=None):
    """Environment for a stock nnU-Net subprocess: the current nnU-Net folders, ``nnUNet_extTrainer``
    (default: nnssl's trainer folder, which is what a user sets) and, only when the real torchvision
    fails to import, the test-only torchvision stand-in first on PYTHONPATH."""
    env = dict(os.environ)
    if not real_torchvision_imports():
        fake = tmp_path / "fake_torchvision"
        (fake / "torchvision").mkdir(parents=True, exist_ok=True)
        (fake / "torchvision" / "__init__.py").write_text(FAKE_TORCHVISION, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join([str(fake), *filter(None, [env.get("PYTHONPATH")])])
    env["nnUNet_extTrainer"] = ext_trainer_folder or nnssl_trainer_folder()
    return env


@pytest.fixture(scope="module")
def model(pretrain_tree, tmp_path_factory):
    """Volume Fusion pretraining (2 iterations) -> fine-tuning of nnsslTrainer (1 epoch, fold all;
    without train()'s final validation, which test_finetune covers and prediction does not need)."""
    from nnssl.training.finetune import RunOptions, apply_run_options, build_trainer
    from nnssl.training.injection import inject_pretrained
    from nnssl.training.pretrainer import pretrain

    root = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed"):
            mp.setenv(var, pretrain_tree[var])
        mp.setenv("nnUNet_results", str(root / "results"))
        pre = pretrain(DS, "volume_fusion", iterations=2, iterations_per_epoch=2, batch_size=2, device="cpu",
                       num_workers=0, output_folder=str(root / "pretraining"))
        trainer = build_trainer(DS, "3d_fullres", "all", device="cpu").trainer
        apply_run_options(trainer, RunOptions(epochs=1, iterations_per_epoch=2, val_iterations=1))
        trainer.initialize()
        inject_pretrained(trainer, os.path.join(pre, "checkpoint_final.pth"))
        trainer.run_training()
        yield {"root": root, "raw": os.path.join(pretrain_tree["nnUNet_raw"], DS)}


@pytest.fixture(scope="module")
def inputs(model):
    """imagesTs plus a copy of its case with another origin, spacing and a rotated direction."""
    folder = model["root"] / "inputs"
    shutil.copytree(os.path.join(model["raw"], "imagesTs"), folder)
    src = sorted(os.listdir(folder))[0]
    img = sitk.ReadImage(str(folder / src))
    write_image(folder / "rotated_0000.nii.gz", sitk.GetArrayFromImage(img), spacing=(0.9, 0.7, 2.5),
                origin=(12.5, -40.0, 7.0), direction=(0, -1, 0, 1, 0, 0, 0, 0, 1))
    return folder


@pytest.fixture(scope="module")
def nnssl_prediction(model, inputs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", str(model["root"] / "results"))
        out = model["root"] / "pred_nnssl"
        result = predict(str(inputs), str(out), "Blobs", "3d_fullres", ["all"], device="cpu", disable_tta=True,
                         npp=0, nps=0)
    return out, result


def header(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def test_output_folder_and_geometry(nnssl_prediction, inputs):
    out, result = nnssl_prediction
    cases = sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(inputs))
    assert sorted(result["predicted"]) == cases and result["skipped"] == []
    assert sorted(os.listdir(out)) == sorted([c + ".nii.gz" for c in cases] +
                                             ["dataset.json", "plans.json", "predict_from_raw_data_args.json"])
    args = json.load(open(out / "predict_from_raw_data_args.json", encoding="utf-8"))
    assert args["output_folder_or_list_of_truncated_output_files"] == str(out)
    assert args["list_of_lists_or_source_folder"] == str(inputs)
    for c in cases:
        size, spacing, origin, direction = header(out / (c + ".nii.gz"))
        isize, ispacing, iorigin, idirection = header(inputs / (c + "_0000.nii.gz"))
        assert size == isize
        np.testing.assert_allclose(spacing, ispacing, atol=1e-5)
        np.testing.assert_allclose(origin, iorigin, atol=1e-5)
        np.testing.assert_allclose(direction, idirection, atol=1e-6)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / (c + ".nii.gz"))))
        assert set(np.unique(seg)) <= {0, 1, 2}
    assert header(out / "rotated.nii.gz")[3] == (0, -1, 0, 1, 0, 0, 0, 0, 1)


def test_stock_nnunetv2_predict_gives_identical_masks(model, inputs, nnssl_prediction, tmp_path, monkeypatch):
    out, _ = nnssl_prediction
    monkeypatch.setenv("nnUNet_results", str(model["root"] / "results"))
    stock_out = tmp_path / "pred_stock"
    cmd = [shutil.which("nnUNetv2_predict"), "-i", str(inputs), "-o", str(stock_out), "-d", DS, "-c", "3d_fullres",
           "-f", "all", "-tr", "nnsslTrainer", "-p", "nnUNetPlans", "-device", "cpu", "--disable_tta",
           "-npp", "0", "-nps", "0"]
    r = subprocess.run(cmd, env=stock_nnunet_env(tmp_path), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(stock_out)) == sorted(os.listdir(out))
    for f in os.listdir(out):
        if f.endswith(".nii.gz"):
            ours = sitk.ReadImage(str(out / f))
            theirs = sitk.ReadImage(str(stock_out / f))
            assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs)), f
            assert header(out / f) == header(stock_out / f)


def test_continue_prediction_and_interrupted_leftovers(model, inputs, nnssl_prediction, monkeypatch):
    out, _ = nnssl_prediction
    monkeypatch.setenv("nnUNet_results", str(model["root"] / "results"))
    os.makedirs(out / STAGING, exist_ok=True)
    (out / STAGING / "half_written.nii.gz").write_bytes(b"\x1f\x8b")  # what a killed run leaves behind
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".nii.gz")}
    result = predict(str(inputs), str(out), DS, "3d_fullres", ["all"], device="cpu", disable_tta=True, npp=0, nps=0,
                     continue_prediction=True)
    assert result["predicted"] == [] and sorted(result["skipped"]) == sorted(f[:-7] for f in before)
    assert {f: os.path.getmtime(out / f) for f in before} == before
    assert not os.path.exists(out / STAGING) and "half_written.nii.gz" not in os.listdir(out)


def test_bad_inputs_are_refused(model, inputs, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_results", str(model["root"] / "results"))
    out = str(tmp_path / "out")
    with pytest.raises(NnsslError, match="Fold 0 has no checkpoint_final.pth.*nnssl_train Dataset001_Blobs 3d_fullres 0"):
        predict(str(inputs), out, DS, "3d_fullres", [0], device="cpu")
    with pytest.raises(NnsslError, match="no checkpoint_latest.pth.*-chk"):
        predict(str(inputs), out, DS, "3d_fullres", ["all"], checkpoint="checkpoint_latest.pth", device="cpu")
    with pytest.raises(NnsslError, match="nnssl_train .* -tr nnUNetTrainer"):
        predict(str(inputs), out, DS, "3d_fullres", ["all"], trainer="nnUNetTrainer", device="cpu")

    two_channels = tmp_path / "two_channels"
    shutil.copytree(inputs, two_channels)
    shutil.copy(two_channels / "rotated_0000.nii.gz", two_channels / "rotated_0001.nii.gz")
    with pytest.raises(NnsslError, match=r"Case 'rotated' .* \['_0000', '_0001'\].* 1 channel\(s\) \(_0000 CT\)"):
        predict(str(two_channels), out, DS, "3d_fullres", ["all"], device="cpu")
    with pytest.raises(NnsslError, match="is the input folder"):
        predict(str(inputs), str(inputs), DS, "3d_fullres", ["all"], device="cpu")
    misnamed = tmp_path / "misnamed"
    misnamed.mkdir()
    shutil.copy(inputs / "rotated_0000.nii.gz", misnamed / "rotated.nii.gz")
    with pytest.raises(NnsslError, match="rotated.nii.gz .* not named CASE_XXXX"):
        predict(str(misnamed), out, DS, "3d_fullres", ["all"], device="cpu")
    assert not os.path.exists(out)  # nothing written for refused inputs


def test_channels_of_a_case_must_share_geometry(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    write_image(tmp_path / "a_0000.nii.gz", arr, spacing=(1, 1, 2))
    write_image(tmp_path / "a_0001.nii.gz", arr, spacing=(1, 1, 2))
    write_image(tmp_path / "b_0000.nii.gz", arr, spacing=(1, 1, 2))
    write_image(tmp_path / "b_0001.nii.gz", arr, spacing=(1, 1, 2), origin=(0, 0, 5))
    dj = {"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}
    with pytest.raises(NnsslError, match=r"Case 'b': channel _0001 .* differs from channel _0000 in origin"):
        collect_cases(str(tmp_path), dj)
    os.remove(tmp_path / "b_0000.nii.gz")
    os.remove(tmp_path / "b_0001.nii.gz")
    assert collect_cases(str(tmp_path), dj) == {"a": [str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz")]}


def test_cli_turns_user_errors_into_exit_code_2(model, inputs, tmp_path, capsys):
    from nnssl.cli.predict import main

    with pytest.raises(SystemExit) as e:
        main(["-i", str(inputs), "-o", str(tmp_path / "o"), "-d", "Blobs", "-c", "3d_fullres", "-f", "1",
              "-device", "cpu"])
    assert e.value.code == 2
    assert "Fold 1 has no checkpoint_final.pth" in capsys.readouterr().err


def test_truncated_or_nan_input_is_refused(model, inputs, monkeypatch, tmp_path):
    """ITK would zero-fill the cut file and turn the NaN into 0: both refused, naming the case."""
    monkeypatch.setenv("nnUNet_results", str(model["root"] / "results"))
    out = tmp_path / "out"
    bad = tmp_path / "bad"
    shutil.copytree(inputs, bad)
    victim = bad / "rotated_0000.nii.gz"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(NnsslError, match=r"Input case 'rotated' \(-i\) is not predicted: .*rotated_0000.nii.gz' is a "
                                         r"truncated or corrupt gzip"):
        predict(str(bad), str(out), DS, "3d_fullres", ["all"], device="cpu", npp=0, nps=0)
    arr = np.zeros((24, 40, 40), np.float32)
    arr[5, 6, 7] = np.nan
    write_image(victim, arr)
    with pytest.raises(NnsslError, match=r"Input case 'rotated' .*contains 1 NaN and 0 infinite voxels.*nan_to_num"):
        predict(str(bad), str(out), DS, "3d_fullres", ["all"], device="cpu", npp=0, nps=0)
    assert not os.path.exists(out)


def test_two_parts_cover_all_cases_disjointly_as_nnunet_splits_them(model, inputs, nnssl_prediction, tmp_path,
                                                                   monkeypatch, capsys):
    """-num_parts 2: part 0 and part 1 write into one folder; together they predict every case once,
    split as nnUNetv2_predict splits the same folder, with the masks of the unsplit prediction."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnssl.cli.predict import main

    monkeypatch.setenv("nnUNet_results", str(model["root"] / "results"))
    folder = tmp_path / "three_cases"
    shutil.copytree(inputs, folder)
    shutil.copy(folder / "rotated_0000.nii.gz", folder / "another_0000.nii.gz")  # 3 cases: 2 + 1
    cases = sorted(f[:-12] for f in os.listdir(folder))
    assert len(cases) == 3
    out = tmp_path / "out"
    predicted = []
    for part in (0, 1):
        with pytest.raises(SystemExit) as e:
            main(["-i", str(folder), "-o", str(out), "-d", DS, "-c", "3d_fullres", "-f", "all", "-device", "cpu",
                  "--disable_tta", "-npp", "0", "-nps", "0", "-num_parts", "2", "-part_id", str(part)])
        assert e.value.code == 0
        assert f"nnssl_predict (part {part} of 0..1): {2 - part} case(s) predicted" in capsys.readouterr().out
        predicted.append(sorted(f[:-7] for f in os.listdir(out) if f.endswith(".nii.gz")
                                and f[:-7] not in sum(predicted, [])))
        reference = nnUNetPredictor(device=torch.device("cpu"))
        reference.dataset_json = {"file_ending": ".nii.gz"}
        nnunet_lists = reference._manage_input_and_output_lists(str(folder), None, part_id=part, num_parts=2)[0]
        assert predicted[part] == sorted(os.path.basename(c[0])[:-12] for c in nnunet_lists)
        assert json.load(open(out / "predict_from_raw_data_args.json"))["part_id"] == part
    assert predicted == [[cases[0], cases[2]], [cases[1]]]
    assert not [f for f in os.listdir(out) if f.startswith(STAGING)]
    unsplit, _ = nnssl_prediction
    for case in ("rotated", *[c for c in cases if c not in ("rotated", "another")]):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(unsplit / f"{case}.nii.gz"))))
    with pytest.raises(NnsslError, match="-part_id must be in 0..1"):
        predict(str(folder), str(out), DS, "3d_fullres", ["all"], device="cpu", num_parts=2, part_id=2)


def test_second_writer_of_an_output_folder_is_refused(model, inputs, tmp_path, capsys):
    """Before: the second run deleted the first one's staging folder and the first died in ITK."""
    from test_locks import write_lock
    from nnssl.cli.predict import main

    out = tmp_path / "o"
    write_lock(str(out), os.getpid())
    os.makedirs(out / STAGING)
    (out / STAGING / "case_004.nii.gz").write_bytes(b"being written")  # the other run's work
    with pytest.raises(SystemExit) as e:
        main(["-i", str(inputs), "-o", str(out), "-d", "Blobs", "-c", "3d_fullres", "-f", "all", "-device", "cpu",
              "--disable_tta", "-npp", "0", "-nps", "0"])
    assert e.value.code == 2
    assert f"The prediction folder (-o) {out} is being written by another run" in capsys.readouterr().err
    assert (out / STAGING / "case_004.nii.gz").read_bytes() == b"being written"
