"""Shared fixtures: an isolated nnU-Net folder tree per test and tiny datasets."""
import hashlib
import importlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

# Validation export and preprocessing are faster with one process on 2 cores.
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_n_proc_DA", "0")


def require_optional(name: str, min_version: str = None, below_version: str = None):
    """Import the optional (test-only, ``pip install -e .[dev]``) module ``name`` and return it, its top-level
    package's ``__version__`` in [``min_version``, ``below_version``). Where it is missing or outside that range
    the test is skipped on a developer machine but FAILS when ``CI=true`` (CI installs ``[dev]``, so a skip
    there would hide a parity test that never ran)."""
    from packaging.version import Version

    problem, module = None, None
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        problem = f"{name} is not installed ({e})"
    if module is not None:
        top = importlib.import_module(name.split(".")[0])
        version = Version(str(getattr(top, "__version__", "0")).split("+")[0])
        if (min_version and version < Version(min_version)) or (below_version and version >= Version(below_version)):
            wanted = " and ".join(w for w in (min_version and f">= {min_version}", below_version and f"< {below_version}")
                                  if w)
            problem = f"{name.split('.')[0]} {version} is installed, this test needs {wanted}"
    if problem is None:
        return module
    message = f"{problem}: install the test extra (pip install -e .[dev])."
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The CI machine has 2 cores and nnU-Net starts worker processes: one intra-op thread per test
    process avoids oversubscription (several times faster here)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Point nnU-Net's three folder variables at fresh folders under tmp_path."""
    env = {}
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        p = tmp_path / sub
        p.mkdir()
        monkeypatch.setenv(var, str(p))
        env[var] = str(p)
    return env


def snapshot(folder):
    """{relative path: sha1} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


def write_image(path, arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    """arr: [Z, Y, X] numpy array (SimpleITK order); spacing/origin in (x, y, z)."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(img, str(path))


def make_blob_case(rng, shape=(24, 40, 40), n_labels=2):
    """A CT-like volume [Z, Y, X] (int16 HU) with n_labels spherical organs and the label map."""
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = np.full(shape, -1000, np.int16)
    body = ((yy - shape[1] / 2) ** 2 + (xx - shape[2] / 2) ** 2) < (0.45 * min(shape[1:])) ** 2
    image[body] = 40
    label = np.zeros(shape, np.uint8)
    for lab in range(1, n_labels + 1):
        c = [rng.uniform(0.3, 0.7) * s for s in shape]
        r = rng.uniform(0.12, 0.2) * min(shape)
        m = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r ** 2
        label[m] = lab
        image[m] = 60 + 80 * lab
    image = (image + rng.normal(0, 10, shape)).astype(np.int16)
    return image, label


def write_raw_dataset(raw_root, name="Dataset001_Blobs", n_train=4, n_test=1, n_labels=2, seed=0,
                      shape=(24, 40, 40), spacing=(0.8, 0.8, 3.0)):
    """A tiny labeled dataset in nnU-Net raw format (CT channel), written directly."""
    rng = np.random.default_rng(seed)
    root = os.path.join(raw_root, name)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n_train + n_test):
        img, lab = make_blob_case(rng, shape, n_labels)
        sp = (spacing[0] * rng.uniform(0.9, 1.1), spacing[1] * rng.uniform(0.9, 1.1), spacing[2])
        case = f"case_{i:03d}"
        if i < n_train:
            write_image(os.path.join(root, "imagesTr", case + "_0000.nii.gz"), img, sp)
            write_image(os.path.join(root, "labelsTr", case + ".nii.gz"), lab, sp)
        else:
            write_image(os.path.join(root, "imagesTs", case + "_0000.nii.gz"), img, sp)
    labels = {"background": 0, **{f"organ{k}": k for k in range(1, n_labels + 1)}}
    with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": n_train,
                   "file_ending": ".nii.gz"}, f, indent=2)
    return root


@pytest.fixture
def blob_dataset(nnunet_env):
    """Dataset001_Blobs (4 train, 1 test) in a fresh nnU-Net tree; returns the raw folder."""
    return write_raw_dataset(nnunet_env["nnUNet_raw"])


@pytest.fixture(scope="session")
def pretrain_tree(tmp_path_factory):
    """Dataset001_Blobs (2 train + 1 test case of 16x32x32 voxels) planned once per session with every
    registered architecture (``--preset tiny``) and preprocessed with its in-task pretraining data,
    the test case included (``--intask_include_test``: three scans, so Volume Fusion's pairs vary).

    Shared and read-only. Every registered architecture is planned: a planner that fails to import
    fails the tests that use this tree (no silent skips).
    """
    from nnssl.architectures import ARCHITECTURES
    from nnssl.planning.api import plan_and_preprocess

    root = tmp_path_factory.mktemp("pretrain_tree")
    tree = {var: str(root / sub) for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                                                  ("nnUNet_results", "results"))}
    planned = ARCHITECTURES.names()
    with pytest.MonkeyPatch.context() as mp:
        for var, folder in tree.items():
            os.makedirs(folder)
            mp.setenv(var, folder)
        # nnU-Net's VRAM estimate calls torch.set_num_threads(n_proc_DA), which is 0 above.
        mp.setenv("nnUNet_n_proc_DA", "1")
        write_raw_dataset(tree["nnUNet_raw"], n_train=2, n_test=1, shape=(16, 32, 32))
        plan_and_preprocess("Dataset001_Blobs", architectures=planned, pretraining=["intask"], preset="tiny",
                            num_processes=1, show_progress=False, intask_include_test=True)
    return {**tree, "dataset": "Dataset001_Blobs", "architectures": planned}


@pytest.fixture
def pretrain_env(pretrain_tree, tmp_path, monkeypatch):
    """nnU-Net variables on the shared ``pretrain_tree`` data, with a fresh results folder per test."""
    monkeypatch.setenv("nnUNet_raw", pretrain_tree["nnUNet_raw"])
    monkeypatch.setenv("nnUNet_preprocessed", pretrain_tree["nnUNet_preprocessed"])
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setenv("nnUNet_results", str(results))
    return {**pretrain_tree, "nnUNet_results": str(results)}
