"""Preprocessing: pretraining data (-pd), sharding (--part), resume, and bad inputs."""
import json
import os
import shutil

import numpy as np
import pytest
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import write_raw_dataset
from test_locks import dead_pid, write_lock
from nnssl.cli.plan_and_preprocess import main
from nnssl.errors import NnsslError
from nnssl.planning.api import plan_and_preprocess
from nnssl.planning.pretraining_data import (MANIFEST, find_pretraining_data, pretraining_cases,
                                             pretraining_data_folder)

DS, UNL, TWO = "Dataset001_Blobs", "Dataset002_Unl", "Dataset003_Two"
DATA = "nnUNetPlans_3d_fullres"
CASES = [f"case_{i:03d}" for i in range(4)]


def write_unlabeled(raw_root, name, channel_files):
    """An unlabeled raw dataset; channel_files: one list of channel image paths per case (copied)."""
    root = os.path.join(raw_root, name)
    os.makedirs(os.path.join(root, "imagesTr"))
    for i, files in enumerate(channel_files):
        for c, f in enumerate(files):
            shutil.copy(f, os.path.join(root, "imagesTr", f"u_{i:03d}_{c:04d}.nii.gz"))
    n_ch = len(channel_files[0])
    with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"channel_names": {str(c): "CT" for c in range(n_ch)}, "labels": {"background": 0},
                   "numTraining": len(channel_files), "file_ending": ".nii.gz", "nnssl_unlabeled": True}, f)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Raw datasets (Blobs: 4 train + 1 test; Unl: Blobs' case_000 and test image, unlabeled; Two: 2 channels)
    and a preprocessed root where Blobs is fingerprinted and planned (plainconvunet) but not preprocessed."""
    root = tmp_path_factory.mktemp("pp_base")
    raw, pp = str(root / "raw"), str(root / "pp")
    blobs = write_raw_dataset(raw)
    case0, test = (os.path.join(blobs, d, f"case_{i:03d}_0000.nii.gz") for d, i in (("imagesTr", 0), ("imagesTs", 4)))
    write_unlabeled(raw, UNL, [[case0], [test]])
    write_unlabeled(raw, TWO, [[case0, case0]])
    with pytest.MonkeyPatch.context() as mp:
        for var, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pp), ("nnUNet_results", str(root))):
            mp.setenv(var, value)
        plan_and_preprocess(DS, no_pp=True, num_processes=1, show_progress=False)
    return raw, pp


@pytest.fixture
def env(base, tmp_path, monkeypatch):
    """A private copy of the planned preprocessed root; returns the Blobs preprocessed folder."""
    raw, pp = base
    shutil.copytree(pp, tmp_path / "pp")
    for var, value in (("nnUNet_raw", raw), ("nnUNet_preprocessed", str(tmp_path / "pp")),
                       ("nnUNet_results", str(tmp_path))):
        monkeypatch.setenv(var, value)
    return str(tmp_path / "pp" / DS)


def run(**kwargs):
    return plan_and_preprocess(DS, num_processes=kwargs.pop("num_processes", 1), show_progress=False, **kwargs)


def arrays(folder, identifier):
    data, seg, _, props = nnUNetDatasetBlosc2(folder).load_case(identifier)
    return np.asarray(data[:]), np.asarray(seg[:]), props


def test_pretraining_data_is_preprocessed_with_the_targets_plans(env, capsys):
    out = run(pretraining=[UNL, "intask", "Blobs"])
    assert "only its images are used" in capsys.readouterr().err  # -pd Blobs is labeled: warned, images used
    unl = pretraining_data_folder(DS, UNL, DATA)
    assert out["pretraining"][UNL]["3d_fullres"] == unl
    assert nnUNetDatasetBlosc2(unl).identifiers == ["u_000", "u_001"]  # the manifest is not mistaken for a case

    # u_000 is Blobs' case_000 without its label: same spacing, transpose and (target) normalization
    labeled, _, _ = arrays(os.path.join(env, DATA), "case_000")
    data, seg, props = arrays(unl, "u_000")
    assert np.array_equal(data, labeled)
    assert data.dtype == np.float32 and data.shape[0] == 1
    assert set(np.unique(seg)) <= {0, -1} and props["class_locations"] == {}

    # intask: the training images only (imagesTs are evaluation images), no labels; the same when -pd names
    # the target itself
    intask = pretraining_data_folder(DS, "intask", DATA)
    assert nnUNetDatasetBlosc2(intask).identifiers == CASES
    assert np.array_equal(arrays(intask, "case_000")[0], labeled)
    named = pretraining_data_folder(DS, DS, DATA)
    assert nnUNetDatasetBlosc2(named).identifiers == CASES
    with open(os.path.join(intask, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["cases"] == CASES and manifest["includes_test_images"] is False
    assert "imagesTs" not in capsys.readouterr().err  # no warning without the flag

    with open(os.path.join(unl, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    assert {k: manifest[k] for k in ("target", "source", "plans_name", "configuration", "data_identifier",
                                     "num_cases", "num_expected")} == \
           {"target": DS, "source": UNL, "plans_name": "nnUNetPlans", "configuration": "3d_fullres",
            "data_identifier": DATA, "num_cases": 2, "num_expected": 2}
    assert find_pretraining_data(DS, UNL, DATA) == unl

    # nnU-Net's own training loader reads it (foreground oversampling falls back to random crops)
    pm = PlansManager(os.path.join(env, "nnUNetPlans.json"))
    with open(os.path.join(env, "dataset.json"), encoding="utf-8") as f:
        label_manager = pm.get_label_manager(json.load(f))
    patch = pm.get_configuration("3d_fullres").patch_size
    loader = nnUNetDataLoader(nnUNetDatasetBlosc2(unl), 2, patch, patch, label_manager,
                              oversample_foreground_percent=1.0)
    batch = loader.generate_train_batch()
    assert tuple(batch["data"].shape) == (2, 1, *patch)
    assert set(np.unique(batch["target"].numpy())) <= {0, -1}


def test_intask_include_test_adds_the_test_images_with_a_warning_and_a_record(env, capsys):
    intask = pretraining_data_folder(DS, "intask", DATA)
    run(pretraining=["intask", UNL], intask_include_test=True)
    err = capsys.readouterr().err
    assert "WARNING --intask_include_test: the 1 imagesTs image(s) of Dataset001_Blobs are pretraining data" in err
    assert nnUNetDatasetBlosc2(intask).identifiers == ["Ts__case_004"] + CASES
    with open(os.path.join(intask, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["cases"] == ["Ts__case_004"] + CASES and manifest["includes_test_images"] is True
    assert manifest["num_expected"] == 5
    # the test image preprocessed like any image of the target (u_001 of -pd Unl is a copy of it)
    unl_copy = arrays(pretraining_data_folder(DS, UNL, DATA), "u_001")[0]
    assert np.array_equal(arrays(intask, "Ts__case_004")[0], unl_copy)

    # rerun without the flag: the data is imagesTr again; the left-over test files are ignored, not used
    run(pretraining=["intask"])
    assert pretraining_cases(intask) == CASES
    assert find_pretraining_data(DS, "intask", DATA) == intask
    assert os.path.isfile(os.path.join(intask, "Ts__case_004.pkl"))


def test_intask_include_test_without_intask_is_refused(env, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-d", "Blobs", "-pd", UNL, "--intask_include_test", "-np", "1", "--no_pbar"])
    assert e.value.code == 2
    assert "--intask_include_test adds Dataset001_Blobs's imagesTs" in capsys.readouterr().err


def test_find_pretraining_data_says_how_to_make_it(env):
    with pytest.raises(NnsslError, match=f"nnssl_plan_and_preprocess -d {DS} -pd intask"):
        find_pretraining_data(DS, "intask", DATA)


def test_parts_give_the_same_files_as_one_run(env):
    run(pretraining=["intask"])
    single = {d: os.path.join(env, "single_" + d) for d in (DATA, f"nnsslPretrain__intask__{DATA}")}
    for d, moved in single.items():
        os.rename(os.path.join(env, d), moved)
        os.remove(os.path.join(env, d + ".nnssl_signature.json"))

    part1 = write_lock(env, os.getpid(), name=".nnssl.part-1-of-2.lock")  # parts run together
    run(pretraining=["intask"], part=0, total_parts=2)
    os.remove(part1)
    assert nnUNetDatasetBlosc2(os.path.join(env, DATA)).identifiers == ["case_000", "case_002"]
    assert nnUNetDatasetBlosc2(os.path.join(env, f"nnsslPretrain__intask__{DATA}")).identifiers == \
           ["case_000", "case_002"]
    with pytest.raises(NnsslError, match="incomplete"):
        find_pretraining_data(DS, "intask", DATA)
    run(pretraining=["intask"], part=1, total_parts=2, num_processes=2)  # the worker-pool path

    for d, moved in single.items():
        assert sorted(os.listdir(os.path.join(env, d))) == sorted(os.listdir(moved))
        for i in nnUNetDatasetBlosc2(moved).identifiers:
            a, b = arrays(moved, i), arrays(os.path.join(env, d), i)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert find_pretraining_data(DS, "intask", DATA)


def test_resume_redoes_only_missing_cases_and_cleans_stale_temporaries(env):
    folder = os.path.join(env, DATA)
    run()
    before = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    data_1 = arrays(folder, "case_001")[0]
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        os.remove(os.path.join(folder, "case_001" + suffix))
    os.remove(os.path.join(folder, "case_002.pkl"))  # renamed last: without it the case is unfinished
    for stale in (".tmp-deadbeef-case_001", ".tmp-cafebabe-gone"):  # killed runs; 'gone' is no case at all
        os.makedirs(os.path.join(folder, stale))
        open(os.path.join(folder, stale, "case_001.b2nd"), "w", encoding="utf-8").close()

    run()
    after = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    assert set(after) == set(before)  # all temporaries gone, all files back
    redone = {f for f in after if f.startswith(("case_001", "case_002"))}
    assert all(after[f] != before[f] for f in redone - {"case_002.b2nd", "case_002_seg.b2nd"})
    assert all(after[f] == before[f] for f in set(after) - redone)
    assert np.array_equal(arrays(folder, "case_001")[0], data_1)

    # a part leaves other parts' temporaries alone (they may be running)
    os.makedirs(os.path.join(folder, ".tmp-0badf00d-case_001"))
    run(part=0, total_parts=2)
    assert os.path.isdir(os.path.join(folder, ".tmp-0badf00d-case_001"))
    run(part=1, total_parts=2)
    assert not os.path.exists(os.path.join(folder, ".tmp-0badf00d-case_001"))


def test_data_from_other_plans_is_not_resumed(env):
    run(pretraining=["intask"])
    plans_file = os.path.join(env, "nnUNetPlans.json")
    with open(plans_file, encoding="utf-8") as f:
        plans = json.load(f)
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0
    with open(plans_file, "w", encoding="utf-8") as f:
        json.dump(plans, f)
    with pytest.raises(NnsslError, match="other plans.*foreground_intensity_properties_per_channel"):
        run(part=0, total_parts=1)
    with pytest.raises(NnsslError, match="other plans"):
        find_pretraining_data(DS, "intask", DATA)


def test_one_writer_per_preprocessed_dataset(env, capsys):
    """Before: two runs preprocessed into one folder and the loser blamed an input file."""
    argv = ["-d", "Blobs", "-np", "1", "--no_pbar"]
    for lock, argv_extra in ((".nnssl.lock", []), (".nnssl.lock", ["--part", "0", "--total_parts", "2"]),
                             (".nnssl.part-1-of-2.lock", [])):
        path = write_lock(env, os.getpid(), name=lock)
        with pytest.raises(SystemExit) as e:
            main(argv + argv_extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"The preprocessed dataset {env} is being written by another run: process {os.getpid()}" in err
        assert f"holds {path}" in err
        os.remove(path)
    assert not os.path.exists(os.path.join(env, DATA))  # nothing was preprocessed
    pid = dead_pid()
    path = write_lock(env, pid)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"stale lock {path}: process {pid}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["-d", "Nope"], "Dataset 'Nope' not found"),
    (["-d", "Blobs", "-pd", "Nope"], "Dataset 'Nope' not found"),
    (["-d", "Blobs", "-a", "nope"], "Unknown architecture"),
    (["-d", "Blobs", "--preset", "huge"], "no preset 'huge'"),
    (["-d", "Blobs", "-np", "0"], "-np 0"),
    (["-d", "Blobs", "--part", "0"], "--part and --total_parts go together"),
    (["-d", "Blobs", "--part", "2", "--total_parts", "2"], "out of range"),
    (["-d", "Blobs", "--clean", "--part", "0", "--total_parts", "2"], "--clean cannot be combined"),
    (["-d", "Blobs", "-a", "resenc", "--part", "0", "--total_parts", "2"], "run `.*--no_pp` once"),
    (["-d", "Blobs", "-c", "3d_lowres", "--part", "0", "--total_parts", "1"], "Configuration '3d_lowres'"),
    (["-d", "Blobs", "-pd", "Two", "--part", "0", "--total_parts", "1"], "has 2 channel"),
])
def test_bad_inputs_exit_with_code_2(env, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv + ["-np", "1", "--no_pbar"] if "-np" not in argv else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nnssl error" in err and __import__("re").search(message, err), err
