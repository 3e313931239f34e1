"""Evaluate a prediction folder: nnU-Net's ``summary.json`` plus HD95 and ASSD in mm per class.

nnU-Net's ``compute_metrics_on_folder`` computes Dice/IoU/TP/FP/FN/TN per case and class and
their means; nnssl adds, under the same keys (so nnU-Net's ``load_summary_json`` and other
tools still read the file):

- per case, ``metric_per_case[i]["metrics"][label]["HD95"]`` and ``["ASSD"]`` (mm, see
  :mod:`nnssl.evaluation.surface`; NaN when exactly one of prediction/reference is empty);
- per class, ``mean[label]``: ``HD95``/``ASSD`` (nan-aware mean over cases) and, for Dice,
  IoU, HD95 and ASSD, ``<metric>_std`` (population std over the cases with a value, ddof=0)
  and ``<metric>_n_nan`` (number of cases where the metric is undefined);
- ``foreground_mean``: ``HD95``/``ASSD`` as the nan-aware mean of the class means (nnU-Net's
  definition of ``foreground_mean`` for Dice), ``<metric>_std`` as the std over cases of the
  per-case mean over foreground classes (the "mean ± std over cases" the papers report) and
  ``<metric>_n_nan`` as the number of undefined (case, class) pairs.

With an ignore label, ignored voxels are removed from the prediction before the surface
metrics, as nnU-Net removes them from the Dice counts. Inputs are validated before anything
is computed (missing/extra predictions, truncated NIfTI files, label values, shape and geometry)
and every problem is reported at once.
"""
import json
import multiprocessing
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from nnssl import datasets, paths
from nnssl.errors import NnsslError
from nnssl.evaluation.surface import hd95_and_assd
from nnssl.io import atomic_path, check_writable

SURFACE_METRICS = ("HD95", "ASSD")
STAT_METRICS = ("Dice", "IoU") + SURFACE_METRICS
# Relative/absolute tolerance for spacing, origin and direction: NIfTI stores them as
# float32, so a prediction written from the reference's geometry differs by rounding only.
_GEOMETRY_TOL = 1e-4
_MAX_LISTED = 10

LabelOrRegion = Union[int, Tuple[int, ...]]


def load_dataset_json(dataset_json_or_name) -> dict:
    """A dataset.json as a dict, a path to one, or a dataset name/ID (read from nnUNet_raw,
    else nnUNet_preprocessed)."""
    if isinstance(dataset_json_or_name, dict):
        dj, source = dataset_json_or_name, "the given dataset.json"
    elif str(dataset_json_or_name).endswith(".json") and os.path.isfile(str(dataset_json_or_name)):
        source = str(dataset_json_or_name)
        with open(source, encoding="utf-8") as f:
            dj = json.load(f)
    else:
        name = datasets.resolve(dataset_json_or_name, where=("raw", "preprocessed"))
        candidates = [os.path.join(root, name, "dataset.json") for root in (paths.raw(), paths.preprocessed())]
        source = next((c for c in candidates if os.path.isfile(c)), None)
        if source is None:
            raise NnsslError(f"No dataset.json for {name} in {' or '.join(candidates)}. Convert the dataset "
                             f"again or pass the path of its dataset.json.")
        with open(source, encoding="utf-8") as f:
            dj = json.load(f)
    missing = [k for k in ("labels", "file_ending") if k not in dj]
    if missing:
        raise NnsslError(f"{source} has no {' / '.join(missing)} entry; a labeled nnU-Net dataset.json needs "
                         f"'labels' and 'file_ending'.")
    return dj


def _label_manager(dj: dict):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    try:
        return LabelManager(dj["labels"], dj.get("regions_class_order"))
    except (AssertionError, RuntimeError, ValueError, TypeError) as e:
        raise NnsslError(f"The 'labels' of the dataset.json are not valid for nnU-Net ({e}); fix dataset.json.")


def _as_key(label_or_region) -> LabelOrRegion:
    """numpy ints / lists -> the plain int / tuple keys nnU-Net's summary uses."""
    if np.isscalar(label_or_region):
        return int(label_or_region)
    return tuple(int(i) for i in label_or_region)


def _listing(items: Sequence[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def list_cases(folder: str, file_ending: str, role: str) -> List[str]:
    """Sorted segmentation file names in ``folder`` (hidden files such as temporaries skipped)."""
    if not os.path.isdir(folder):
        raise NnsslError(f"The {role} folder '{folder}' does not exist; pass an existing folder.")
    files = sorted(f for f in os.listdir(folder) if f.endswith(file_ending) and not f.startswith(".")
                   and os.path.isfile(os.path.join(folder, f)))
    if not files:
        raise NnsslError(f"The {role} folder '{folder}' contains no '{file_ending}' files (the file ending "
                         f"from dataset.json); point it at the folder holding the segmentations.")
    return files


def match_cases(ref_files: Sequence[str], pred_files: Sequence[str], ref_folder: str, pred_folder: str,
                ignore_extra: bool = False) -> List[str]:
    """The file names to evaluate; raises for missing predictions and (unless ignored) extra ones."""
    missing = sorted(set(ref_files) - set(pred_files))
    extra = sorted(set(pred_files) - set(ref_files))
    if missing:
        raise NnsslError(f"{len(missing)} reference case(s) in '{ref_folder}' have no prediction in "
                         f"'{pred_folder}': {_listing(missing)}. Predict them first, or evaluate against a "
                         f"reference folder that holds only the predicted cases.")
    if extra and not ignore_extra:
        raise NnsslError(f"{len(extra)} prediction(s) in '{pred_folder}' have no reference in '{ref_folder}': "
                         f"{_listing(extra)}. Check that -ref and -pred belong together, or pass "
                         f"--ignore_extra to evaluate only the cases with a reference.")
    return sorted(set(ref_files) & set(pred_files))


def _geometry_mismatch(ref_props, pred_props, path: str = "") -> Optional[str]:
    """The first geometry field (spacing, origin, direction, affine...) that differs, or None."""
    if isinstance(ref_props, dict):
        for k, v in ref_props.items():
            if isinstance(pred_props, dict) and k in pred_props:
                found = _geometry_mismatch(v, pred_props[k], f"{path}.{k}" if path else str(k))
                if found:
                    return found
        return None
    try:
        r, p = np.asarray(ref_props, dtype=float), np.asarray(pred_props, dtype=float)
    except (TypeError, ValueError):
        return None  # not a numeric geometry field
    if r.shape != p.shape or not np.allclose(r, p, rtol=_GEOMETRY_TOL, atol=_GEOMETRY_TOL):
        return f"{path}: prediction {p.tolist()} vs reference {r.tolist()}"
    return None


def _bad_values(seg: np.ndarray, allowed: Iterable[int]) -> List[float]:
    return [float(v) for v in np.unique(seg) if v not in set(allowed)]


def case_surface_metrics(ref_file: str, pred_file: str, reader_writer, labels_or_regions: Sequence[LabelOrRegion],
                         allowed_values: Sequence[int], ignore_label: Optional[int]) -> dict:
    """Validate one case and compute its HD95/ASSD per label or region.

    Returns {"problems": [str, ...], "metrics": {label: {"HD95": mm, "ASSD": mm}}}; metrics are
    empty when the case has a problem. Segmentations are read as nnU-Net reads them
    ([1, Z, Y, X] with ``spacing`` in the same axis order), so no axis reordering is needed.
    """
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    from nnssl.dataset_conversion.validation import check_nifti_complete

    case = os.path.basename(pred_file)
    try:  # ITK reads a cut-off NIfTI zero-filled: it would be scored as background
        for file in (ref_file, pred_file):
            check_nifti_complete(file, decompress=False)
    except NnsslError as e:
        return {"problems": [str(e).rstrip(".")], "metrics": {}}
    try:
        ref, ref_props = reader_writer.read_seg(ref_file)
        pred, pred_props = reader_writer.read_seg(pred_file)
    except Exception as e:  # any reader failure is a bad input file, reported with its name
        return {"problems": [f"{case}: could not be read ({type(e).__name__}: {e})"], "metrics": {}}
    problems = []
    for seg, file in ((ref, ref_file), (pred, pred_file)):
        bad = _bad_values(seg, allowed_values)
        if bad:
            problems.append(f"{file}: label values {[int(v) if v.is_integer() else v for v in bad]} are not in "
                            f"dataset.json (allowed: {list(allowed_values)})")
    if ref.shape != pred.shape:
        problems.append(f"{case}: prediction shape {tuple(pred.shape[1:])} != reference shape {tuple(ref.shape[1:])}")
    else:
        mismatch = _geometry_mismatch(ref_props, pred_props)
        if mismatch:
            problems.append(f"{case}: geometry differs from the reference ({mismatch})")
    if problems:
        return {"problems": problems, "metrics": {}}
    ref, pred, spacing = ref[0], pred[0], ref_props["spacing"]
    keep = ref != ignore_label if ignore_label is not None else np.ones(ref.shape, bool)
    metrics = {}
    for r in labels_or_regions:
        h, a = hd95_and_assd(region_or_label_to_mask(pred, r) & keep, region_or_label_to_mask(ref, r), spacing)
        metrics[r] = {"HD95": h, "ASSD": a}
    return {"problems": [], "metrics": metrics}


def _case_surface_metrics_star(args):
    return case_surface_metrics(*args)


def case_statistics(values: Iterable[float]) -> Tuple[float, float, int]:
    """(mean, population std, number of NaNs) of per-case values, ignoring NaNs."""
    arr = np.asarray(list(values), dtype=float)
    ok = arr[~np.isnan(arr)]
    if ok.size == 0:
        return float("nan"), float("nan"), int(arr.size)
    return float(ok.mean()), float(ok.std()), int(arr.size - ok.size)


def per_case_foreground_mean(metric_per_case: Sequence[dict], metric: str) -> List[float]:
    """For each case, the nan-aware mean of ``metric`` over foreground classes (NaN if none)."""
    out = []
    for case in metric_per_case:
        vals = [m[metric] for k, m in case["metrics"].items() if str(k) != "0" and metric in m]
        vals = [float(v) for v in vals if not np.isnan(v)]
        out.append(float(np.mean(vals)) if vals else float("nan"))
    return out


def add_statistics(result: dict, labels_or_regions: Sequence[LabelOrRegion]) -> None:
    """Fill mean/std/NaN counts into ``result['mean']`` and ``result['foreground_mean']`` (in place)."""
    cases = result["metric_per_case"]
    for metric in STAT_METRICS:
        class_means = []
        n_nan_total = 0
        for r in labels_or_regions:
            mean, std, n_nan = case_statistics(c["metrics"][r][metric] for c in cases)
            if metric in SURFACE_METRICS:
                result["mean"][r][metric] = mean  # Dice/IoU means stay nnU-Net's own
            result["mean"][r][f"{metric}_std"] = std
            result["mean"][r][f"{metric}_n_nan"] = n_nan
            class_means.append(result["mean"][r][metric])
            n_nan_total += n_nan
        fg = result["foreground_mean"]
        if metric in SURFACE_METRICS:
            fg[metric] = case_statistics(class_means)[0]
        fg[f"{metric}_std"] = case_statistics(per_case_foreground_mean(cases, metric))[1]
        fg[f"{metric}_n_nan"] = n_nan_total


def _surface_pass(jobs: List[tuple], num_processes: int) -> List[dict]:
    bar = dict(total=len(jobs), desc="HD95/ASSD", unit="case")
    if num_processes <= 1:
        return [case_surface_metrics(*j) for j in tqdm(jobs, **bar)]
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        return list(tqdm(pool.imap(_case_surface_metrics_star, jobs), **bar))


def evaluate_folder(ref_folder: str, pred_folder: str, dataset_json_or_name, output_file: Optional[str] = None,
                    num_processes: int = 1, ignore_extra: bool = False) -> dict:
    """Evaluate ``pred_folder`` against ``ref_folder``; write and return the extended summary.

    dataset_json_or_name: dataset.json dict or path, or a dataset name/ID (see :func:`load_dataset_json`).
    output_file: default ``pred_folder/summary.json``; written atomically.
    Returns the summary as nnU-Net's ``compute_metrics_on_folder`` does (int/tuple label keys).
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, save_summary_json
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    ref_folder, pred_folder = os.path.abspath(ref_folder), os.path.abspath(pred_folder)
    output_file = os.path.abspath(output_file or os.path.join(pred_folder, "summary.json"))
    if not output_file.endswith(".json"):
        raise NnsslError(f"Output file '{output_file}' must end with .json (it is an nnU-Net summary.json).")
    check_writable(os.path.dirname(output_file), "The folder of the summary file (-o, default: -pred)")
    dj = load_dataset_json(dataset_json_or_name)
    ending = dj["file_ending"]
    ref_files = list_cases(ref_folder, ending, "reference")
    cases = match_cases(ref_files, list_cases(pred_folder, ending, "prediction"), ref_folder, pred_folder,
                        ignore_extra)
    lm = _label_manager(dj)
    labels = [_as_key(r) for r in (lm.foreground_regions if lm.has_regions else lm.foreground_labels)]
    allowed = sorted(int(v) for v in set(lm.all_labels) | ({lm.ignore_label} if lm.has_ignore_label else set()))
    try:
        rw = determine_reader_writer_from_dataset_json(dj, os.path.join(ref_folder, ref_files[0]), verbose=False)()
    except RuntimeError as e:
        raise NnsslError(f"No nnU-Net reader can open '{os.path.join(ref_folder, ref_files[0])}' with file "
                         f"ending '{ending}' ({e}); check the file and dataset.json's file_ending.")

    jobs = [(os.path.join(ref_folder, c), os.path.join(pred_folder, c), rw, labels, allowed, lm.ignore_label)
            for c in cases]
    surface = dict(zip(cases, _surface_pass(jobs, num_processes)))
    problems = [p for c in cases for p in surface[c]["problems"]]
    if problems:
        raise NnsslError(f"{len(problems)} problem(s) with the segmentations: " + "; ".join(problems[:_MAX_LISTED])
                         + ("; ..." if len(problems) > _MAX_LISTED else "")
                         + ". Fix or re-export these files (predictions must have the reference's geometry and "
                           "only labels from dataset.json).")

    # nnU-Net evaluates every file in the prediction folder; when some are not evaluated
    # (extras, leftover temporaries) it gets a folder of links to exactly the matched cases.
    everything = sorted(f for f in os.listdir(pred_folder) if f.endswith(ending))
    with tempfile.TemporaryDirectory(prefix="nnssl_eval_") as links:
        folder = pred_folder
        if everything != cases:
            folder = links
            for c in cases:
                os.symlink(os.path.join(pred_folder, c), os.path.join(links, c))
        result = compute_metrics_on_folder(ref_folder, folder, None, rw, ending, labels, lm.ignore_label,
                                           num_processes=max(1, num_processes))
    for case in result["metric_per_case"]:
        name = os.path.basename(case["prediction_file"])
        case["prediction_file"] = os.path.join(pred_folder, name)
        for r in labels:
            case["metrics"][r].update(surface[name]["metrics"][r])
    add_statistics(result, labels)
    with atomic_path(output_file) as tmp:
        save_summary_json(result, tmp)
    return result


def label_names(dj: dict) -> Dict[str, str]:
    """Summary key (``"1"`` or ``"(1, 2)"``) -> class name from dataset.json's labels."""
    return {str(_as_key(v)): k for k, v in dj.get("labels", {}).items() if k not in ("background", "ignore")}


def format_summary(result: dict, names: Optional[Dict[str, str]] = None) -> str:
    """A plain-text table of per-class mean ± std (Dice, HD95 mm, ASSD mm) and the foreground mean."""
    names = names or {}

    def cell(stats: dict, metric: str, digits: int) -> str:
        n_nan = stats.get(f"{metric}_n_nan", 0)
        s = f"{stats[metric]:.{digits}f} ± {stats.get(f'{metric}_std', float('nan')):.{digits}f}"
        return s + (f" ({n_nan} undef.)" if n_nan and metric in SURFACE_METRICS else "")

    rows = [("class", "Dice", "HD95 [mm]", "ASSD [mm]")]
    for k, stats in result["mean"].items():
        rows.append((f"{k} {names.get(str(k), '')}".strip(), cell(stats, "Dice", 3), cell(stats, "HD95", 2),
                     cell(stats, "ASSD", 2)))
    fg = result["foreground_mean"]
    rows.append(("foreground mean", cell(fg, "Dice", 3), cell(fg, "HD95", 2), cell(fg, "ASSD", 2)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
