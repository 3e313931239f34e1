"""Write a synthetic BTCV-like dataset in the original BTCV folder layout (SPEC §3, §8).

Layout under ``out_dir``::

    RawData/Training/img/img0001.nii.gz     RawData/Training/label/label0001.nii.gz   (cases)
    RawData/Testing/img/img0007.nii.gz ...  (numbering continues after the training cases)
    TestingLabels/label0007.nii.gz ...      (ground truth of the test cases, outside RawData,
                                             which like BTCV has no test labels)
    Unlabeled/unlabeled_0001.nii.gz ...     (same distribution, optionally another field of view)
    nnssl_synthetic.json                    (the settings; a rerun must use the same ones)

Every volume has its own random generator ``default_rng([seed, kind, index])`` (kind 0 training,
1 testing, 2 unlabeled; index from 1), so a volume depends only on the seed, its kind and index,
never on how many others are generated. Files are written atomically; a rerun with the same
settings skips finished files and writes only the missing ones.
"""
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnssl.dataset_conversion.phantom import DEFAULT_SHAPE, LABELS, Phantom, check_shape, make_phantom
from nnssl.errors import NnsslError
from nnssl.io import atomic_path, write_json

__all__ = ["DEFAULT_SHAPE", "LABELS", "Phantom", "make_phantom", "write_synthetic_btcv", "volume_rng"]

MANIFEST = "nnssl_synthetic.json"
KINDS = {"training": 0, "testing": 1, "unlabeled": 2}


def volume_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """The generator of one volume: kind in KINDS, index counted from 1 within its kind."""
    return np.random.default_rng([seed, KINDS[kind], index])


def _to_sitk(array: np.ndarray, ph: Phantom) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(ph.spacing)
    img.SetOrigin(ph.origin)
    img.SetDirection(ph.direction)
    return img


def _write(array: np.ndarray, ph: Phantom, path: str) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(_to_sitk(array, ph), tmp, True)


def _validate(cases, test_cases, unlabeled, seed, shape, unlabeled_fov_scale) -> Tuple[int, int, int]:
    if int(cases) != cases or cases < 1:
        raise NnsslError(f"--cases {cases} is invalid: give the number of labeled training cases, an integer >= 1.")
    for flag, n in (("--test_cases", test_cases), ("--unlabeled", unlabeled)):
        if int(n) != n or n < 0:
            raise NnsslError(f"{flag} {n} is invalid: give a count >= 0 (0 writes none).")
    if int(seed) != seed or seed < 0:
        raise NnsslError(f"--seed {seed} is invalid: give a non-negative integer.")
    if not (math.isfinite(unlabeled_fov_scale) and unlabeled_fov_scale > 0):
        raise NnsslError(f"--unlabeled_fov_scale {unlabeled_fov_scale} is invalid: give a positive number "
                         f"(1 = same field of view as the labeled cases, 2 = twice as large, 0.5 = a crop).")
    return check_shape(shape)


def _check_folder(out_dir: str, settings: dict) -> None:
    """Refuse to mix volumes of different settings, or to write into a folder we did not make."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NnsslError(f"Output '{out_dir}' exists and is not a folder; pass another -o.")
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            old = json.load(f)
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
            raise NnsslError(f"'{out_dir}' already holds a synthetic dataset made with other settings ({diff}). "
                             f"Rerun with the same flags to resume it, or pass a new -o folder.")
        return
    for sub in ("RawData", "Unlabeled", "TestingLabels"):
        d = os.path.join(out_dir, sub)
        if os.path.isdir(d) and any(files for _, _, files in os.walk(d)):
            raise NnsslError(f"'{d}' already contains files but '{out_dir}' has no {MANIFEST}, so it was not "
                             f"written by nnssl_synthetic (it may be real data). Pass an empty or new -o folder.")


def _jobs(root: Dict[str, str], cases: int, test_cases: int, unlabeled: int) -> List[tuple]:
    """(kind, index, labeled, image path, label path or None) for every volume."""
    tr, ts = os.path.join(root["raw_data"], "Training"), os.path.join(root["raw_data"], "Testing")
    jobs = [("training", i, True, os.path.join(tr, "img", f"img{i:04d}.nii.gz"),
             os.path.join(tr, "label", f"label{i:04d}.nii.gz")) for i in range(1, cases + 1)]
    jobs += [("testing", j, True, os.path.join(ts, "img", f"img{cases + j:04d}.nii.gz"),
              os.path.join(root["testing_labels"], f"label{cases + j:04d}.nii.gz")) for j in range(1, test_cases + 1)]
    jobs += [("unlabeled", k, False, os.path.join(root["unlabeled"], f"unlabeled_{k:04d}.nii.gz"), None)
             for k in range(1, unlabeled + 1)]
    return jobs


def write_synthetic_btcv(out_dir: str, cases: int = 6, test_cases: int = 2, unlabeled: int = 8, seed: int = 0,
                         shape=DEFAULT_SHAPE, unlabeled_fov_scale: float = 1.0) -> dict:
    """Write ``cases`` labeled training cases, ``test_cases`` test cases and ``unlabeled`` unlabeled
    volumes of shape (Z, Y, X). Returns {"raw_data": <out_dir>/RawData, "unlabeled":
    <out_dir>/Unlabeled, "testing_labels": <out_dir>/TestingLabels} (absolute paths)."""
    shape = _validate(cases, test_cases, unlabeled, seed, shape, unlabeled_fov_scale)
    out_dir = os.path.abspath(out_dir)
    settings = {"generator": "nnssl_synthetic", "version": 1, "seed": int(seed), "shape": list(shape),
                "cases": int(cases), "test_cases": int(test_cases), "unlabeled": int(unlabeled),
                "unlabeled_fov_scale": float(unlabeled_fov_scale)}
    _check_folder(out_dir, settings)
    root = {"raw_data": os.path.join(out_dir, "RawData"), "unlabeled": os.path.join(out_dir, "Unlabeled"),
            "testing_labels": os.path.join(out_dir, "TestingLabels")}
    for d in (os.path.join(root["raw_data"], "Training", "img"), os.path.join(root["raw_data"], "Training", "label"),
              os.path.join(root["raw_data"], "Testing", "img"), root["unlabeled"], root["testing_labels"]):
        os.makedirs(d, exist_ok=True)
    if not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        write_json(settings, os.path.join(out_dir, MANIFEST))
    jobs = _jobs(root, int(cases), int(test_cases), int(unlabeled))
    for kind, index, labeled, img_path, lab_path in tqdm(jobs, desc="nnssl_synthetic", unit="volume"):
        targets = [p for p in (img_path, lab_path) if p is not None]
        if all(os.path.isfile(p) for p in targets):
            continue  # finished in an earlier run (atomic writes: a present file is complete)
        fov = unlabeled_fov_scale if kind == "unlabeled" else 1.0
        ph = make_phantom(volume_rng(seed, kind, index), shape, labeled=labeled, fov_scale=fov)
        if not os.path.isfile(img_path):
            _write(ph.image, ph, img_path)
        if lab_path is not None and not os.path.isfile(lab_path):
            _write(ph.label, ph, lab_path)
    return root
