"""DICOM series: find them in a folder and read them only when every slice is there.

ITK stacks whatever slices GDCM finds and sets the z-spacing to the mean distance between the
first and the last one; a missing slice (or a truncated one, which GDCM leaves out of the
series) then gives a volume with a wrong z-spacing and only a warning on stderr. So before a
series is accepted:

- every DICOM-like file of the folder belongs to a readable series (a truncated slice does not);
- the slice positions (ImagePositionPatient projected onto the slice normal from
  ImageOrientationPatient) are evenly spaced: no gap, no two slices at one position.

Every failure raises :class:`~nnssl.errors.NnsslError` naming the series and the slice files;
``nnssl_convert_unlabeled --skip_bad`` turns it into a ``skipped`` entry with the reason.
"""
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnssl.errors import NnsslError

DICOM_EXTENSIONS = (".dcm", ".ima")
# Assumption: slice distances may differ from their median by 5 % (or 0.01 mm) -- positions are
# stored as decimal strings, rounded by scanners; a missing slice is a 100 % deviation.
SLICE_SPACING_RTOL = 0.05
SLICE_SPACING_ATOL_MM = 0.01
_FIX = "Export the series again (all slices), or pass --skip_bad to leave it out."


def is_dicom_file(path: str) -> bool:
    """By extension, or the "DICM" marker after the 128-byte preamble of DICOM Part 10 files."""
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def dicom_series(folder: str) -> List[Tuple[str, List[str]]]:
    """All DICOM series in one folder (not recursive): [(series_uid, slice files sorted by GDCM)].

    Raises when a DICOM-like file of the folder is in no series (GDCM cannot parse it: truncated
    or corrupt), since its series would silently lack a slice.
    """
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not uids:
        raise NnsslError(
            f"Folder '{folder}' holds DICOM-like files but no readable DICOM series (missing series UID or "
            f"pixel data). Export the series again, or remove the files from the input."
        )
    series = [(uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))) for uid in sorted(uids)]
    listed = {os.path.abspath(f) for _, files in series for f in files}
    unreadable = sorted(f for f in os.listdir(folder)
                        if not f.startswith(".") and f.upper() != "DICOMDIR"
                        and os.path.isfile(os.path.join(folder, f)) and is_dicom_file(os.path.join(folder, f))
                        and os.path.abspath(os.path.join(folder, f)) not in listed)
    if unreadable:
        raise NnsslError(
            f"DICOM file(s) {', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''} in '{folder}' belong "
            f"to no readable series (truncated or corrupt), so a series of this folder lacks slices. {_FIX}"
        )
    return series


def read_dicom_series(folder: str, uid: str, files: List[str]) -> sitk.Image:
    """Read one series (slices in GDCM's order) after checking its slice positions."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, to check the positions
    try:
        image = reader.Execute()
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise NnsslError(
            f"Cannot read DICOM series {uid} in '{folder}': {lines[-1] if lines else 'RuntimeError'}. Some slices "
            f"are probably corrupt; export the series again."
        ) from None
    positions = _slice_positions(reader, len(files))
    if positions is not None:
        check_slice_positions(positions, [os.path.basename(f) for f in files], f"DICOM series {uid} in '{folder}'")
    return image


def _floats(reader: sitk.ImageSeriesReader, i: int, tag: str) -> Optional[List[float]]:
    if not reader.HasMetaDataKey(i, tag):
        return None
    try:
        return [float(v) for v in reader.GetMetaData(i, tag).split("\\")]
    except ValueError:
        return None


def _slice_positions(reader: sitk.ImageSeriesReader, n: int) -> Optional[np.ndarray]:
    """[n] slice positions in mm along the slice normal; None when a slice lacks the tags (then
    nothing can be checked and ITK's geometry is taken as it is)."""
    ipp = [_floats(reader, i, "0020|0032") for i in range(n)]
    iop = _floats(reader, 0, "0020|0037")
    if iop is None or len(iop) != 6 or any(p is None or len(p) != 3 for p in ipp):
        return None
    normal = np.cross(iop[:3], iop[3:])
    return np.asarray(ipp, float) @ normal


def check_slice_positions(positions: Sequence[float], names: Sequence[str], what: str) -> None:
    """positions: [n] slice positions in mm, in stacking order; names: the slice files.

    Raises when two slices share a position, the order reverses, or a distance differs from the
    median distance by more than the tolerance (a missing slice doubles one distance)."""
    steps = np.diff(np.asarray(positions, float))
    if steps.size == 0:
        return
    median = float(np.median(steps))
    tol = max(SLICE_SPACING_RTOL * abs(median), SLICE_SPACING_ATOL_MM)
    for k, step in enumerate(steps):
        pair = f"slices {names[k]} and {names[k + 1]}"
        if abs(step) < SLICE_SPACING_ATOL_MM:
            raise NnsslError(f"{what}: {pair} lie at the same position ({positions[k]:.4g} mm); the series holds a "
                             f"duplicate or belongs to two acquisitions. {_FIX}")
        if abs(step - median) > tol:
            missing = abs(step) > 1.5 * abs(median)
            gap = "a slice is missing or unreadable" if missing else "the slices are unevenly spaced"
            raise NnsslError(
                f"{what}: {pair} are {abs(step):.4g} mm apart, while the other slices are {abs(median):.4g} mm apart "
                f"(tolerance {tol:.2g} mm): {gap}, and stacking it would give a wrong z-spacing. {_FIX}")
