"""A folder of unlabeled volumes (files and DICOM series) -> an unlabeled nnU-Net raw dataset.

Sources, found recursively under the input folder:

- every ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ``.mhd`` file;
- every DICOM series: a folder holding ``.dcm``/``.ima`` files or files with the DICOM magic
  bytes is read with GDCM, one output volume per series UID (a folder may hold several).

Other files (except the ``.raw``/``.zraw`` voxel files of ``.mhd`` headers) are listed as
``ignored`` in the log. Sources are sorted by path (then series UID) and numbered
``NAME_0001_0000.nii.gz``, ``NAME_0002_0000.nii.gz``, ... in ``imagesTr/``;
``conversion_log.json`` maps every output to its source. A source that fails validation
(unreadable, truncated, not 3D, NaN/Inf voxels, DICOM folder without a series, DICOM series with
a missing, truncated or unevenly spaced slice: ``dicom.py``) stops the
conversion with an error naming it, before anything is written; with ``skip_bad`` it is left
out instead and listed under ``skipped`` in the log (with the reason). Writing goes through a
hidden staging folder renamed into place at the end; an interrupted run resumes (``_staging``).
"""
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Tuple

import SimpleITK as sitk
from tqdm import tqdm

from nnssl import paths
from nnssl.dataset_conversion import _staging
from nnssl.dataset_conversion.dicom import dicom_series, is_dicom_file, read_dicom_series
from nnssl.dataset_conversion.validation import check_3d, check_finite_image, header_of, read_image, require_folder
from nnssl.errors import NnsslError
from nnssl.io import atomic_path, write_json

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Source:
    """One output volume: a file, or a DICOM series (``path`` is then its folder)."""
    path: str
    series_uid: Optional[str] = None
    files: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How error messages name this source."""
        return self.path if self.series_uid is None else f"{self.path} (DICOM series {self.series_uid})"

    def read(self) -> sitk.Image:
        if self.series_uid is None:
            return read_image(self.path)
        return read_dicom_series(self.path, self.series_uid, list(self.files))

    def describe(self) -> dict:
        d = {"source": self.path}
        if self.series_uid is not None:
            d.update(series_uid=self.series_uid, slices=len(self.files))
        return d


def scan_folder(input_dir: str) -> Tuple[List[str], List[str], List[str]]:
    """(volume files, DICOM folders, ignored files) under ``input_dir``, each sorted; hidden entries
    and the nnUNet_raw folder itself (should it lie inside) are skipped."""
    raw_root = os.path.abspath(paths.raw())
    volumes, dicom_dirs, ignored = [], [], []
    for folder, subdirs, files in os.walk(input_dir):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")
                            and os.path.abspath(os.path.join(folder, d)) != raw_root)
        has_dicom = False
        headers = {f[:-4] for f in files if f.lower().endswith(".mhd")}
        for fname in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(folder, fname)
            if fname.lower().endswith(VOLUME_EXTENSIONS):
                volumes.append(path)
            elif fname.lower().endswith((".raw", ".zraw")) and fname.rsplit(".", 1)[0] in headers:
                continue  # the voxel file of a .mhd header, read through the header
            elif is_dicom_file(path):
                has_dicom = True
            else:
                ignored.append(path)
        if has_dicom:
            dicom_dirs.append(folder)
    return sorted(volumes), sorted(dicom_dirs), sorted(ignored)


def validate_source(src: Source) -> None:
    """Readable, complete, single-component 3D, finite voxels."""
    img = src.read()
    check_3d(header_of(img, src.label))
    check_finite_image(img, src.path, src.label)


def collect_sources(input_dir: str, skip_bad: bool = False, progress: bool = True) -> Tuple[List[Source], List[dict],
                                                                                            List[str]]:
    """(valid sources in output order, skipped sources with their errors, ignored files)."""
    require_folder(input_dir, "Input folder", "Pass a folder of volumes with -i.")
    volumes, dicom_dirs, ignored = scan_folder(input_dir)
    sources, skipped = [Source(v) for v in volumes], []

    def bad(src: Source, err: NnsslError) -> None:
        if not skip_bad:
            raise err
        skipped.append({**src.describe(), "error": str(err)})

    for folder in dicom_dirs:
        try:
            sources += [Source(folder, uid, tuple(files)) for uid, files in dicom_series(folder)]
        except NnsslError as e:
            bad(Source(folder), e)
    sources.sort(key=lambda s: (os.path.relpath(s.path, input_dir), s.series_uid or ""))
    if not sources and not skipped:
        raise NnsslError(
            f"Found no volumes in '{input_dir}' (searched recursively for {', '.join(VOLUME_EXTENSIONS)} files and "
            f"DICOM series; {len(ignored)} other file(s) ignored). Check the -i folder."
        )
    valid = []
    for src in tqdm(sources, desc="Checking volumes", disable=not progress):
        try:
            validate_source(src)
            valid.append(src)
        except NnsslError as e:
            bad(src, e)
    if not valid:
        raise NnsslError(f"All {len(skipped)} volume(s) in '{input_dir}' failed validation; the first error: "
                         f"{skipped[0]['error']}")
    return valid, skipped, ignored


def _write_volume(src: Source, dst: str) -> None:
    """Atomically write ``src`` as .nii.gz: a byte copy for .nii.gz files, else via SimpleITK."""
    with atomic_path(dst) as tmp:
        if src.series_uid is None and src.path.lower().endswith(".nii.gz"):
            shutil.copyfile(src.path, tmp)
        else:
            sitk.WriteImage(src.read(), tmp, useCompression=True)


def convert_unlabeled(input_dir: str, dataset_id: Optional[int] = None, name: str = "Unlabeled",
                      channel_name: str = "CT", skip_bad: bool = False, overwrite: bool = False,
                      progress: bool = True) -> str:
    """Convert every volume under ``input_dir``; returns the new ``$nnUNet_raw/DatasetXXX_NAME`` folder."""
    input_dir = os.path.abspath(input_dir)
    full, final = _staging.choose_target(dataset_id, name, overwrite)
    sources, skipped, ignored = collect_sources(input_dir, skip_bad, progress)
    cases = [{"output": f"imagesTr/{name}_{i:04d}_0000.nii.gz", **s.describe()} for i, s in enumerate(sources, 1)]
    inputs = [f for s in sources for f in (s.files or (s.path,))]
    stage = _staging.open_stage(final, [cases, _staging.fingerprint(inputs)])
    for src, case in tqdm(list(zip(sources, cases)), desc=f"Writing {full}", disable=not progress):
        dst = os.path.join(stage, case["output"])
        if not os.path.isfile(dst):  # finished by an interrupted run with the same inputs
            _write_volume(src, dst)
    write_json({"input": input_dir, "cases": cases, "skipped": skipped, "ignored": ignored},
               os.path.join(stage, "conversion_log.json"))
    write_json({
        "name": name,
        "channel_names": {"0": channel_name},
        "labels": {"background": 0},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "nnssl_unlabeled": True,
        "nnssl_source": f"nnssl_convert_unlabeled from {input_dir} (see conversion_log.json)",
    }, os.path.join(stage, "dataset.json"))
    _staging.publish(stage, final)
    return final
