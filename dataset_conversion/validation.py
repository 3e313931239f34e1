"""Checks on raw input volumes and nnU-Net raw dataset folders.

Every check raises :class:`~nnssl.errors.NnsslError` naming the offending file and the fix.
The converters run these checks on every input before they write anything, and
``nnssl_plan_and_preprocess`` runs :func:`validate_raw_dataset` before planning, so a bad
volume is reported by name instead of surfacing as a traceback deep inside nnU-Net.

Two SimpleITK behaviours shape this module: it raises a bare ``RuntimeError`` for unreadable
files (turned into NnsslError here), and it reads a *truncated* NIfTI (``.nii`` or
``.nii.gz``) without complaint, returning zero-filled voxels -- so NIfTI files are also checked
for completeness against their own header (:func:`check_nifti_complete`) in every header read,
cheaply (file size, gzip trailer) and therefore always, not only with
``--verify_dataset_integrity``.

Image sizes and geometry are in SimpleITK's (x, y, z) order; voxel arrays are ``[Z, Y, X]``.
"""
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnssl.errors import NnsslError

K = TypeVar("K")

# nnU-Net compares geometry with np.allclose (rtol 1e-5, atol 1e-8).
# Assumption: atol 1e-6 (ITK's own default coordinate/direction tolerance) instead of 1e-8, so
# float32 round-off in NIfTI headers (directions stored as quaternions) is not a mismatch.
GEOMETRY_RTOL = 1e-5
GEOMETRY_ATOL = 1e-6

DATASET_JSON_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass(frozen=True)
class ImageHeader:
    """What SimpleITK knows about a volume without reading its voxels (sizes in x, y, z order)."""
    path: str
    dimension: int
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    components: int


def _header(obj, path: str, components: int) -> ImageHeader:
    return ImageHeader(path, obj.GetDimension(), tuple(obj.GetSize()), tuple(obj.GetSpacing()),
                       tuple(obj.GetOrigin()), tuple(obj.GetDirection()), components)


def header_of(image: sitk.Image, path: str) -> ImageHeader:
    """Header of an already-read image (e.g. a DICOM series, where ``path`` names the folder)."""
    return _header(image, path, image.GetNumberOfComponentsPerPixel())


def read_header(path: str) -> ImageHeader:
    """Read only the header of a volume file; unreadable or unknown formats raise NnsslError."""
    if not os.path.isfile(path):
        raise NnsslError(f"Expected image file '{path}' does not exist. Check the path or add the missing file.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise NnsslError(
            f"Cannot read the image header of '{path}': {_last_line(e)}. The file is corrupt, truncated or "
            f"not a medical image format SimpleITK knows; re-export or re-download it, or remove it from the input."
        ) from None
    header = _header(reader, path, reader.GetNumberOfComponents())
    check_nifti_complete(path, decompress=False)
    return header


def read_image(path: str) -> sitk.Image:
    """Read a whole volume, making sure the file is complete (see module docstring)."""
    read_header(path)
    check_nifti_complete(path, decompress=True)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise NnsslError(
            f"Cannot read the voxels of '{path}': {_last_line(e)}. The file is probably truncated or corrupt "
            f"(an interrupted copy or download); copy or download it again."
        ) from None


def _last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def check_nifti_complete(path: str, decompress: bool = True) -> None:
    """Raise if a NIfTI file holds fewer bytes than its header promises.

    The header promises ``vox_offset + prod(dim) * bitpix / 8`` bytes. ``.nii``: compared with
    the file size. ``.nii.gz``: compared with the gzip trailer's ISIZE (the decompressed length
    mod 2**32, the file's last 4 bytes), which costs two small reads: a file cut short ends in
    compressed data instead, whose last 4 bytes match by chance with probability 2**-32. Only
    when they do not match, or with ``decompress``, is the whole stream decompressed (which also
    verifies its end marker and checksum): multi-member gzip files (ISIZE covers the last member
    only) or files with bytes after the voxel data are then judged by their real length.
    """
    lower = path.lower()
    if not lower.endswith((".nii", ".nii.gz")):
        return
    import nibabel  # an nnunetv2 dependency; used only to parse the on-disk NIfTI header

    try:
        img = nibabel.load(path)
        expected = int(img.dataobj.offset) + int(np.prod(img.header.get_data_shape())) * \
            img.header.get_data_dtype().itemsize
    except (nibabel.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        if lower.endswith(".gz"):  # a small file cut short fails already here: say that it is cut
            _gzip_length(path)
        raise NnsslError(f"'{path}' is not a valid NIfTI file ({e}); re-export or re-download it.") from None
    if lower.endswith(".nii"):
        actual = os.path.getsize(path)
    elif not decompress and _gzip_isize(path) == expected % 2 ** 32:
        return
    else:
        actual = _gzip_length(path)
    if actual < expected:
        raise NnsslError(
            f"'{path}' is truncated: its header needs {expected} bytes of data but the file holds {actual}. "
            f"Copy or download it again."
        )


def _gzip_isize(path: str) -> int:
    """The gzip trailer's ISIZE field: the uncompressed length mod 2**32 (little-endian, last 4 bytes)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4))
        return int.from_bytes(f.read(4), "little")


def _gzip_length(path: str) -> int:
    """Decompressed length of a whole gzip file; NnsslError if the stream is cut off or corrupt."""
    actual = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                actual += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        raise NnsslError(
            f"'{path}' is a truncated or corrupt gzip file ({e}); it was probably cut off by an interrupted "
            f"copy or download. Copy or download it again."
        ) from None
    return actual


def check_3d(h: ImageHeader) -> None:
    """nnssl works on single-component 3D volumes with more than one slice."""
    if h.components != 1:
        raise NnsslError(
            f"'{h.path}' has {h.components} components per voxel (e.g. RGB or a vector field); nnssl needs one "
            f"intensity per voxel. Convert it to a scalar image, or save each component as its own channel file."
        )
    if h.dimension == 4:
        raise NnsslError(
            f"'{h.path}' is a 4D image (size {h.size}); nnssl needs 3D volumes. If the 4th axis holds modalities, "
            f"split it into one file per channel (CASE_0000, CASE_0001, ...; nnssl_convert_msd does this for MSD "
            f"tasks); if it is a time series, pick one time point."
        )
    if h.dimension != 3 or min(h.size) < 2:
        raise NnsslError(
            f"'{h.path}' is not a 3D volume (dimension {h.dimension}, size {h.size}); nnssl needs 3D volumes with "
            f"more than one slice. Stack 2D slices into a volume first (for DICOM, keep the series' slices together "
            f"in one folder)."
        )


def check_finite(array: np.ndarray, path: str) -> None:
    """array: voxels of ``path``, any shape. NaN/Inf would poison normalization statistics."""
    if not np.issubdtype(array.dtype, np.floating) or np.isfinite(array).all():
        return
    n_nan = int(np.isnan(array).sum())
    n_inf = int(np.isinf(array).sum())
    raise NnsslError(
        f"'{path}' contains {n_nan} NaN and {n_inf} infinite voxels. Replace them with a meaningful value "
        f"(e.g. the image minimum, numpy.nan_to_num) and save the file again."
    )


def check_finite_image(image: sitk.Image, path: str, name: Optional[str] = None) -> None:
    """NaN/Inf check of a read volume (``name`` labels it in messages; default ``path``).

    ITK's NIfTI reader silently turns NaN/Inf into 0, hiding them from nnU-Net but not from
    other readers of the same file, so floating-point NIfTI files are also checked on disk.
    """
    name = name or path
    check_finite(sitk.GetArrayViewFromImage(image), name)
    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel

        proxy = nibabel.load(path)
        if np.issubdtype(proxy.header.get_data_dtype(), np.floating):
            check_finite(np.asarray(proxy.dataobj), name)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def check_same_geometry(ref: ImageHeader, other: ImageHeader) -> None:
    """``other`` (a label or another channel) must lie on the voxel grid of ``ref``."""
    fix = ("Resample one onto the other's grid (labels with nearest-neighbour interpolation) or re-export both "
           "from the same source so that their headers agree.")
    if ref.size != other.size:
        raise NnsslError(f"'{other.path}' has shape {other.size} but '{ref.path}' has shape {ref.size}. {fix}")
    for what in ("spacing", "origin", "direction"):
        a, b = getattr(ref, what), getattr(other, what)
        if not np.allclose(a, b, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL):
            raise NnsslError(f"'{other.path}' has {what} {_fmt(b)} but '{ref.path}' has {what} {_fmt(a)}. {fix}")


def check_label_values(array: np.ndarray, allowed: Set[int], path: str, dataset_json: str = "dataset.json") -> None:
    """array: a label map; every value must be one of the integer label values in dataset.json."""
    values = np.unique(array)
    bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in allowed)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:20]) + (" ..." if len(bad) > 20 else "")
        raise NnsslError(
            f"'{path}' contains label values {shown} that are not in the labels of {dataset_json} "
            f"(allowed: {sorted(allowed)}). Add them to 'labels' in {dataset_json} or relabel the file."
        )


def require_folder(path: str, what: str, fix: str) -> None:
    if not os.path.isdir(path):
        raise NnsslError(f"{what} '{path}' does not exist or is not a folder. {fix}")


# ---------------------------------------------------------------------------- raw dataset folders


def load_dataset_json(folder: str) -> dict:
    """Load and check ``folder/dataset.json`` (keys, types, channel numbering)."""
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise NnsslError(
            f"No dataset.json in '{folder}'. An nnU-Net raw dataset needs one with channel_names, labels, "
            f"numTraining and file_ending; the nnssl_convert_* commands write it, or write it by hand."
        )
    try:
        with open(path, encoding="utf-8") as f:
            dj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NnsslError(f"'{path}' is not valid JSON ({e}). Fix the syntax (e.g. a missing comma or quote).") from None
    if not isinstance(dj, dict):
        raise NnsslError(f"'{path}' must hold a JSON object with {', '.join(DATASET_JSON_KEYS)}.")
    missing = [k for k in DATASET_JSON_KEYS if k not in dj]
    if missing:
        raise NnsslError(f"'{path}' lacks the key(s) {', '.join(missing)}; nnU-Net needs all of "
                         f"{', '.join(DATASET_JSON_KEYS)}. Add them.")
    ch = dj["channel_names"]
    if not isinstance(ch, dict) or not ch or sorted(ch, key=str) != sorted(str(i) for i in range(len(ch))):
        raise NnsslError(f"'{path}': channel_names must map \"0\", \"1\", ... to channel names, e.g. "
                         f"{{\"0\": \"CT\"}}; found {ch!r}.")
    if not isinstance(dj["labels"], dict):
        raise NnsslError(f"'{path}': labels must map names to values, e.g. {{\"background\": 0, \"liver\": 1}}.")
    if not dj.get("nnssl_unlabeled"):
        allowed_label_values(dj["labels"], path)
        if dj["labels"].get("background") != 0:
            raise NnsslError(f"'{path}': labels must contain \"background\": 0 (nnU-Net requires it).")
    n = dj["numTraining"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise NnsslError(f"'{path}': numTraining must be a non-negative integer; found {n!r}.")
    fe = dj["file_ending"]
    if not isinstance(fe, str) or not fe.startswith("."):
        raise NnsslError(f"'{path}': file_ending must be a file extension such as \".nii.gz\"; found {fe!r}.")
    return dj


def allowed_label_values(labels: Dict[str, object], path: str = "dataset.json") -> Set[int]:
    """Integer values a label map may hold: ``{"liver": 1}`` or region lists ``{"tumor": [2, 3]}``."""
    values = set()
    for name, v in labels.items():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, bool) or not isinstance(x, int):
                raise NnsslError(f"'{path}': label '{name}' has value {v!r}; label values must be integers.")
            values.add(x)
    return values


def find_cases(images_dir: str, file_ending: str, n_channels: int) -> Dict[str, List[str]]:
    """{case: [channel file paths 0..n_channels-1]} for an imagesTr/imagesTs folder."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    channels: Dict[str, Dict[int, str]] = {}
    for fname in sorted(os.listdir(images_dir)):
        if fname.startswith(".") or not fname.endswith(file_ending):
            continue
        m = pattern.match(fname)
        if not m:
            raise NnsslError(f"'{os.path.join(images_dir, fname)}' does not follow nnU-Net's naming "
                             f"CASE_XXXX{file_ending} (XXXX = 4-digit channel index, 0000 for the first). Rename it.")
        channels.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(images_dir, fname)
    cases = {}
    for case, found in channels.items():
        extra = sorted(set(found) - set(range(n_channels)))
        missing = [f"{case}_{i:04d}{file_ending}" for i in range(n_channels) if i not in found]
        if extra:
            raise NnsslError(f"'{found[extra[0]]}' has channel index {extra[0]} but dataset.json lists only "
                             f"{n_channels} channel(s) in channel_names. Add the channel there or remove the file.")
        if missing:
            raise NnsslError(f"Case '{case}' in '{images_dir}' lacks channel file(s) {', '.join(missing)}: "
                             f"dataset.json lists {n_channels} channel(s). Add the files or fix channel_names.")
        cases[case] = [found[i] for i in range(n_channels)]
    return cases


def _check_case(files: List[str], label: Optional[str], allowed: Set[int], full: bool, dj_path: str) -> None:
    headers = [read_header(f) for f in files]
    for h in headers:
        check_3d(h)
        check_same_geometry(headers[0], h)
    if label is not None:
        lh = read_header(label)
        check_3d(lh)
        check_same_geometry(headers[0], lh)
    if full:  # GetArrayFromImage (a copy): a view would outlive its temporary image
        for f in files:
            check_finite_image(read_image(f), f)
        if label is not None:
            check_label_values(sitk.GetArrayFromImage(read_image(label)), allowed, label, dj_path)


def validate_raw_dataset(folder: str, full: bool = True, progress: bool = True) -> dict:
    """Check an nnU-Net raw dataset folder; raise NnsslError on the first problem.

    ``full=False``: dataset.json, files present per channel/label, readable headers, 3D, same
    geometry across a case's channels and label, NIfTI files as long as their header says
    (file size / gzip trailer). ``full=True`` also reads every voxel: finite intensities, label
    values listed in dataset.json, gzip streams decompressed to their end (checksum). Datasets marked
    ``"nnssl_unlabeled": true`` have no labels. Returns ``{"cases", "test_cases", "unlabeled"}``.
    """
    require_folder(folder, "Dataset folder", "Convert the dataset first (nnssl_convert_*) or check nnUNet_raw.")
    dj = load_dataset_json(folder)
    dj_path = os.path.join(folder, "dataset.json")
    unlabeled = bool(dj.get("nnssl_unlabeled"))
    fe, n_ch = dj["file_ending"], len(dj["channel_names"])
    images_tr = os.path.join(folder, "imagesTr")
    require_folder(images_tr, "imagesTr folder", f"Put the training images into {images_tr}.")
    cases = find_cases(images_tr, fe, n_ch)
    if not cases:
        raise NnsslError(f"'{images_tr}' holds no images ending in {fe} (the file_ending in dataset.json). "
                         f"Add the images, or fix file_ending.")
    if dj["numTraining"] != len(cases):
        raise NnsslError(f"'{dj_path}' says numTraining is {dj['numTraining']} but '{images_tr}' holds {len(cases)} "
                         f"cases. Set numTraining to {len(cases)} or add the missing cases.")
    labels = _label_files(folder, cases, fe) if not unlabeled else {c: None for c in cases}
    allowed = set() if unlabeled else allowed_label_values(dj["labels"], dj_path)
    images_ts = os.path.join(folder, "imagesTs")
    test_cases = find_cases(images_ts, fe, n_ch) if os.path.isdir(images_ts) else {}
    jobs = [(f, labels[c]) for c, f in cases.items()] + [(f, None) for f in test_cases.values()]
    for files, label in tqdm(jobs, desc=f"Checking {os.path.basename(folder)}", disable=not progress):
        _check_case(files, label, allowed, full, dj_path)
    return {"cases": sorted(cases), "test_cases": sorted(test_cases), "unlabeled": unlabeled}


def check_pairs(images: Dict[K, str], labels: Dict[K, str], no_label: Callable[[K, str], str],
                no_image: Callable[[K, str], str]) -> None:
    """Every image has a label and every label an image (matched by key); NnsslError for the first
    that does not (in key order), with the message ``no_label(key, image path)`` or
    ``no_image(key, label path)``: the one pairing check of every converter and of the raw-data check."""
    for key in sorted(images):
        if key not in labels:
            raise NnsslError(no_label(key, images[key]))
    for key in sorted(labels):
        if key not in images:
            raise NnsslError(no_image(key, labels[key]))


def _label_files(folder: str, cases: Iterable[str], fe: str) -> Dict[str, str]:
    labels_tr = os.path.join(folder, "labelsTr")
    require_folder(labels_tr, "labelsTr folder", "Put one label file per training case there, or mark an unlabeled "
                   "dataset with \"nnssl_unlabeled\": true in dataset.json.")
    expected = {c: os.path.join(labels_tr, c + fe) for c in cases}
    present = {f[:-len(fe)]: os.path.join(labels_tr, f) for f in os.listdir(labels_tr)
               if f.endswith(fe) and not f.startswith(".")}
    check_pairs({c: expected[c] for c in cases}, present,
                lambda c, _: f"Training case '{c}' has no label file '{expected[c]}'. Add it or remove the case's "
                             f"images.",
                lambda c, p: f"'{p}' has no image in imagesTr (expected {c}_0000{fe}). Add the image or remove the "
                             f"label.")
    return expected
