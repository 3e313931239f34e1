"""Medical Segmentation Decathlon task folder -> nnU-Net raw dataset, via nnU-Net's converter.

nnU-Net's ``convert_msd_dataset`` splits 4D multi-modal images into one file per channel and
rewrites the old MSD ``dataset.json``, but it reports problems with bare asserts (or not at
all: a NaN volume or a label value missing from dataset.json passes through). nnssl checks
the task folder completely first, then lets nnU-Net convert into a hidden staging folder and
renames the result into place (see ``_staging``), so a failed run leaves no half dataset.
"""
import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnssl import paths
from nnssl.dataset_conversion import _staging
from nnssl.dataset_conversion.validation import (ImageHeader, check_3d, check_finite_image,
                                                 check_label_values, check_pairs, check_same_geometry, header_of,
                                                 read_image, require_folder)
from nnssl.errors import NnsslError
from nnssl.io import write_json

# nnU-Net's converter splits the folder name at its only underscore: Task05_Prostate.
_TASK_RE = re.compile(r"^Task(\d+)_([A-Za-z0-9-]+)$")
_MSD_KEYS = ("modality", "labels", "numTraining", "training", "test")


def read_msd_json(task_dir: str) -> dict:
    """The old-format MSD dataset.json, checked for the keys nnU-Net's converter relies on."""
    path = os.path.join(task_dir, "dataset.json")
    if not os.path.isfile(path):
        raise NnsslError(f"No dataset.json in MSD task folder '{task_dir}'. Every MSD task ships one; extract the "
                         f"task archive again.")
    try:
        with open(path, encoding="utf-8") as f:
            dj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NnsslError(f"'{path}' is not valid JSON ({e}). Fix it or extract the task archive again.") from None
    missing = [k for k in _MSD_KEYS if not isinstance(dj, dict) or k not in dj]
    if missing:
        raise NnsslError(f"'{path}' lacks the key(s) {', '.join(missing)} of the MSD format ({', '.join(_MSD_KEYS)}). "
                         f"Is this an MSD task (not an nnU-Net v1/v2 dataset)? Add the keys or extract it again.")
    mod = dj["modality"]
    if not isinstance(mod, dict) or not mod or sorted(mod) != sorted(str(i) for i in range(len(mod))):
        raise NnsslError(f"'{path}': modality must map \"0\", \"1\", ... to modality names; found {mod!r}.")
    labels = dj["labels"]
    if not isinstance(labels, dict) or not all(re.fullmatch(r"\d+", str(k)) for k in labels) \
            or labels.get("0") != "background":
        raise NnsslError(f"'{path}': labels must map label values to names with \"0\": \"background\", e.g. "
                         f"{{\"0\": \"background\", \"1\": \"tumour\"}}; found {labels!r}.")
    return dj


def _nii_gz_files(folder: str) -> Dict[str, str]:
    """{file name: path}; nnU-Net's converter skips names starting with '.' or '_' (macOS metadata)."""
    out = {}
    for fname in sorted(os.listdir(folder)):
        if fname.startswith((".", "_")):
            continue
        if not fname.endswith(".nii.gz"):
            raise NnsslError(f"'{os.path.join(folder, fname)}' is not a .nii.gz file; MSD task folders hold .nii.gz "
                             f"files only. Compress it (gzip) or move it out of the task folder.")
        out[fname] = os.path.join(folder, fname)
    return out


def find_msd_cases(task_dir: str, dj: dict) -> Tuple[List[Tuple[str, str]], List[str]]:
    """([(training image, label)], [test images]) of an MSD task folder."""
    sub = {s: os.path.join(task_dir, s) for s in ("imagesTr", "labelsTr", "imagesTs")}
    for s, p in sub.items():
        require_folder(p, f"MSD {s} folder", "nnU-Net's converter needs imagesTr, labelsTr and imagesTs (create an "
                                              "empty imagesTs if the task has no test images).")
    images, labels = _nii_gz_files(sub["imagesTr"]), _nii_gz_files(sub["labelsTr"])
    if not images:
        raise NnsslError(f"'{sub['imagesTr']}' holds no .nii.gz images. Check the -i folder.")
    check_pairs(images, labels,
                lambda fname, path: f"'{path}' has no label '{os.path.join(sub['labelsTr'], fname)}'. Add it or move "
                                    f"the image to imagesTs.",
                lambda fname, path: f"'{path}' has no image in '{sub['imagesTr']}'. Add the image or remove the "
                                    f"label.")
    if dj["numTraining"] != len(images):
        raise NnsslError(f"'{os.path.join(task_dir, 'dataset.json')}' says numTraining is {dj['numTraining']} but "
                         f"'{sub['imagesTr']}' holds {len(images)} images. Fix numTraining or add the missing cases.")
    train = [(images[f], labels[f]) for f in sorted(images)]
    return train, sorted(_nii_gz_files(sub["imagesTs"]).values())


def _spatial_header(img: sitk.Image, path: str, n_modalities: int) -> ImageHeader:
    """Header of the 3D grid of an MSD image: 3D for one modality, 4D [modality last] for several."""
    h = header_of(img, path)
    if n_modalities == 1 or h.dimension != 4:
        check_3d(h)
        if n_modalities > 1:
            raise NnsslError(f"'{path}' is 3D but the task's dataset.json lists {n_modalities} modalities, which MSD "
                             f"stores as a 4D image (modality last). Fix 'modality' or the image.")
        return h
    if h.size[3] != n_modalities:
        raise NnsslError(f"'{path}' holds {h.size[3]} modalities (4th axis) but dataset.json lists {n_modalities}. "
                         f"Fix 'modality' in dataset.json or the image.")
    d = np.asarray(h.direction).reshape(4, 4)[:3, :3].ravel()
    spatial = ImageHeader(path, 3, h.size[:3], h.spacing[:3], h.origin[:3], tuple(d), h.components)
    check_3d(spatial)
    return spatial


def validate_msd_case(image: str, label: Optional[str], n_modalities: int, allowed: set, dj_path: str) -> None:
    """Readable, finite image with the task's modalities; label on its grid with listed values."""
    img = read_image(image)
    h = _spatial_header(img, image, n_modalities)
    check_finite_image(img, image)
    if label is not None:
        lab = read_image(label)
        lh = header_of(lab, label)
        check_3d(lh)
        check_same_geometry(h, lh)
        check_label_values(sitk.GetArrayViewFromImage(lab), allowed, label, dj_path)


@contextlib.contextmanager
def _nnunet_folders(root: str) -> Iterator[None]:
    """Point nnU-Net's three folder variables at ``root`` while its converter runs.

    nnssl has already checked the target ID across the real folders (allowing a re-conversion of
    the same name, which nnU-Net's own check would refuse); nnU-Net sees only the empty staging root.
    """
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update({n: root for n in names})
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def convert_msd(task_dir: str, dataset_id: Optional[int] = None, overwrite: bool = False, num_processes: int = 1,
                progress: bool = True) -> str:
    """Convert an MSD ``TaskXX_Name`` folder; returns the new ``$nnUNet_raw/DatasetXXX_Name`` folder.

    Default ID: the task number (as nnU-Net does).
    """
    raw_root = paths.raw()  # also sets nnU-Net's folder variables before any nnU-Net import
    task_dir = os.path.abspath(task_dir.rstrip("/\\"))
    require_folder(task_dir, "MSD task folder", "Pass an extracted Medical Segmentation Decathlon task with -i.")
    m = _TASK_RE.match(os.path.basename(task_dir))
    if not m:
        raise NnsslError(f"MSD task folder '{task_dir}' must be named TaskXX_Name with a single underscore "
                         f"(e.g. Task05_Prostate); nnU-Net's converter reads the task number and name from it. "
                         f"Rename it or link it under such a name.")
    target_id = int(m.group(1)) if dataset_id is None else int(dataset_id)
    full, final = _staging.choose_target(target_id, m.group(2), overwrite)
    dj = read_msd_json(task_dir)
    train, test = find_msd_cases(task_dir, dj)
    n_mod, allowed = len(dj["modality"]), {int(k) for k in dj["labels"]}
    jobs = train + [(t, None) for t in test]
    for image, label in tqdm(jobs, desc="Checking MSD cases", disable=not progress):
        validate_msd_case(image, label, n_mod, allowed, os.path.join(task_dir, "dataset.json"))

    from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset

    os.makedirs(raw_root, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=f".partial-{full}-", dir=raw_root)
    try:
        with _nnunet_folders(tmp_root):
            convert_msd_dataset(task_dir, overwrite_target_id=target_id, num_processes=max(1, num_processes))
        stage = os.path.join(tmp_root, full)
        with open(os.path.join(stage, "dataset.json"), encoding="utf-8") as f:
            out_json = json.load(f)
        out_json["nnssl_source"] = f"nnssl_convert_msd (nnU-Net's MSD converter) from {task_dir}"
        write_json(out_json, os.path.join(stage, "dataset.json"))
        _staging.publish(stage, final)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final
