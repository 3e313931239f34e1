"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault) original layout -> nnU-Net raw dataset.

Input ``RawData/Training/img/img0001.nii.gz``, ``RawData/Training/label/label0001.nii.gz``
and (optional) ``RawData/Testing/img/img0061.nii.gz``; output
``$nnUNet_raw/DatasetXXX_BTCV/{imagesTr/BTCV_0001_0000.nii.gz, labelsTr/BTCV_0001.nii.gz,
imagesTs/BTCV_0061_0000.nii.gz, dataset.json}``.

Every case is validated before anything is written. Valid ``.nii.gz`` files are copied byte
for byte (voxels and geometry preserved exactly); ``.nii`` files are read and written as
``.nii.gz`` with SimpleITK, which keeps voxels, spacing, origin and direction. Writing goes
through a hidden staging folder renamed into place at the end (see ``_staging``).
"""
import os
import re
import shutil
from typing import List, Optional, Tuple

import SimpleITK as sitk
from tqdm import tqdm

from nnssl.dataset_conversion import _staging
from nnssl.dataset_conversion.validation import (check_3d, check_finite_image, check_label_values, check_pairs,
                                                 check_same_geometry, header_of, read_image, require_folder)
from nnssl.errors import NnsslError
from nnssl.io import atomic_path, write_json

BTCV_LABELS = {
    "background": 0, "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5,
    "liver": 6, "stomach": 7, "aorta": 8, "inferior_vena_cava": 9, "portal_and_splenic_veins": 10,
    "pancreas": 11, "right_adrenal_gland": 12, "left_adrenal_gland": 13,
}
_NAME_RE = {"img": re.compile(r"^img(\d+)\.nii(\.gz)?$"), "label": re.compile(r"^label(\d+)\.nii(\.gz)?$")}

# (case number, image path, label path or None)
Case = Tuple[int, str, Optional[str]]


def _numbered_files(folder: str, kind: str) -> dict:
    """{case number: path} for ``img0001.nii.gz`` / ``label0001.nii.gz`` files in ``folder``."""
    out = {}
    for fname in sorted(os.listdir(folder)):
        if fname.startswith("."):
            continue
        m = _NAME_RE[kind].match(fname)
        if not m:
            raise NnsslError(
                f"Unexpected file '{os.path.join(folder, fname)}' in a BTCV {kind} folder; files there must be named "
                f"{kind}0001.nii.gz (or .nii). Rename it or move it out of the folder."
            )
        num = int(m.group(1))
        if num in out:
            raise NnsslError(f"'{out[num]}' and '{os.path.join(folder, fname)}' are both case {num}; keep one of them.")
        out[num] = os.path.join(folder, fname)
    return out


def find_btcv_cases(raw_data: str) -> Tuple[List[Case], List[Case]]:
    """Training cases (with labels) and test cases (without) of a BTCV ``RawData`` folder."""
    require_folder(raw_data, "BTCV input folder", "Pass the extracted BTCV RawData folder with -i.")
    if os.path.isdir(os.path.join(raw_data, "RawData", "Training")):
        raw_data = os.path.join(raw_data, "RawData")  # accept the folder that contains RawData as well
    layout = "RawData/Training/img/img0001.nii.gz and RawData/Training/label/label0001.nii.gz"
    img_dir, label_dir = (os.path.join(raw_data, "Training", sub) for sub in ("img", "label"))
    require_folder(img_dir, "BTCV training image folder", f"The BTCV input must follow the layout {layout}.")
    require_folder(label_dir, "BTCV training label folder", f"The BTCV input must follow the layout {layout}.")
    images, labels = _numbered_files(img_dir, "img"), _numbered_files(label_dir, "label")
    if not images:
        raise NnsslError(f"'{img_dir}' holds no BTCV images (img0001.nii.gz, ...). Check the -i folder ({layout}).")
    check_pairs(images, labels,
                lambda num, path: f"'{path}' has no label file label{num:04d}.nii.gz in '{label_dir}'. Add the label "
                                  f"or move the image out of Training/img (unlabeled scans belong in Testing/img).",
                lambda num, path: f"'{path}' has no image img{num:04d}.nii.gz in '{img_dir}'. Add the image or "
                                  f"remove the label.")
    train = [(n, images[n], labels[n]) for n in sorted(images)]
    test_dir = os.path.join(raw_data, "Testing", "img")
    test_images = _numbered_files(test_dir, "img") if os.path.isdir(test_dir) else {}
    test = [(n, test_images[n], None) for n in sorted(test_images)]
    clash = sorted(set(images) & {n for n, _, _ in test})
    if clash:
        raise NnsslError(f"Case number {clash[0]} appears in both Training/img and Testing/img of '{raw_data}'; "
                         f"case numbers must be unique. Rename one of them.")
    return train, test


def validate_case(case: Case) -> None:
    """Readable, 3D, finite image; readable 3D label on the image's grid with BTCV label values."""
    _, img_path, label_path = case
    img = read_image(img_path)
    h = header_of(img, img_path)
    check_3d(h)
    check_finite_image(img, img_path)
    if label_path is not None:
        lab = read_image(label_path)
        lh = header_of(lab, label_path)
        check_3d(lh)
        check_same_geometry(h, lh)
        check_label_values(sitk.GetArrayViewFromImage(lab), set(BTCV_LABELS.values()), label_path,
                           "the BTCV label list (0-13)")


def _copy_volume(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` (.nii.gz) atomically: bytes if already .nii.gz, else via SimpleITK."""
    with atomic_path(dst) as tmp:
        if src.lower().endswith(".nii.gz"):
            shutil.copyfile(src, tmp)
        else:
            sitk.WriteImage(read_image(src), tmp, useCompression=True)


def convert_btcv(raw_data: str, dataset_id: Optional[int] = None, name: str = "BTCV", overwrite: bool = False,
                 progress: bool = True) -> str:
    """Convert a BTCV ``RawData`` folder; returns the new ``$nnUNet_raw/DatasetXXX_NAME`` folder."""
    raw_data = os.path.abspath(raw_data)
    full, final = _staging.choose_target(dataset_id, name, overwrite)
    train, test = find_btcv_cases(raw_data)
    for case in tqdm(train + test, desc="Checking BTCV cases", disable=not progress):
        validate_case(case)

    outputs = []  # (source, destination relative to the dataset folder)
    for num, img, label in train:
        outputs += [(img, f"imagesTr/{name}_{num:04d}_0000.nii.gz"), (label, f"labelsTr/{name}_{num:04d}.nii.gz")]
    outputs += [(img, f"imagesTs/{name}_{num:04d}_0000.nii.gz") for num, img, _ in test]
    stage = _staging.open_stage(final, [outputs, _staging.fingerprint([src for src, _ in outputs])])
    for src, rel in tqdm(outputs, desc=f"Writing {full}", disable=not progress):
        dst = os.path.join(stage, rel)
        if not os.path.isfile(dst):  # finished by an interrupted run with the same inputs
            _copy_volume(src, dst)
    write_json({
        "name": name,
        "channel_names": {"0": "CT"},
        "labels": BTCV_LABELS,
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "nnssl_source": f"nnssl_convert_btcv from the BTCV original layout in {raw_data} "
                        f"({len(train)} labeled training cases, {len(test)} test cases)",
    }, os.path.join(stage, "dataset.json"))
    _staging.publish(stage, final)
    return final
