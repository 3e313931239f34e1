"""Generic planning of an unlabeled pool: the foundation-model mode (SPEC §4 "generic").

A pool planned generically is its own target: ``nnssl_plan_and_preprocess -d CTUnlabeled
--generic`` fingerprints only what an unlabeled set has, plans with every requested
architecture's planner (nnU-Net's spacing, transpose and patch/batch heuristics), and
preprocesses the pool's images as the pool's own ``intask`` pretraining data, so that
``nnssl_pretrain -d CTUnlabeled -m METHOD -a ARCH`` needs no labeled dataset at all.

- **Fingerprint** (:func:`body_fingerprint`): spacings, shapes after nnU-Net's nonzero crop and
  intensity statistics over the *body* instead of over labels; written in nnU-Net's
  ``dataset_fingerprint.json`` format, so nnU-Net's planners read it unchanged.
  Assumption: the body is the voxels above ``BODY_THRESHOLD_HU`` (-500 HU, between air and fat)
  on a CT channel and the non-zero voxels on other channels (``body_threshold`` argument).
- **Normalization**: CT is clipped to a fixed HU window and scaled to [-1, 1] (MIS-FM: [-1000,
  1000]); this is nnU-Net's own ``CTNormalization`` with window statistics (clip to
  [percentile_00_5, percentile_99_5] = [low, high], then (x - mean) / std with mean = the window
  centre and std = half its width), so stock nnU-Net preprocesses and predicts with these plans.
  ``zscore`` uses nnU-Net's ``ZScoreNormalization`` per image instead.
- **Spacing**: nnU-Net's rule by default; ``"median"`` is the per-axis median of the pool;
  three numbers fix it (in the axis order nnU-Net reads the images in, like nnU-Net's
  ``overwrite_target_spacing``).

A labeled dataset planned with ``--generic`` is treated as a pool: its labels are ignored.
"""
import multiprocessing
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from tqdm import tqdm

from nnssl import paths
from nnssl.errors import NnsslError
from nnssl.io import write_json
from nnssl.planning.pretraining_data import INTASK, source_images

MIS_FM_CT_WINDOW = (-1000.0, 1000.0)
BODY_THRESHOLD_HU = -500.0
# nnU-Net samples 10^8 foreground voxels over the whole dataset; a pool can have 10^5 volumes,
# so the per-case sample has a floor (and the fingerprint's percentiles stay stable).
TOTAL_INTENSITY_SAMPLES = 10e7
MIN_SAMPLES_PER_CASE = 1000


def window_intensity_properties(low: float, high: float) -> Dict[str, float]:
    """Statistics that make nnU-Net's CTNormalization clip to [low, high] and scale it to [-1, 1]."""
    low, high = float(low), float(high)
    if not high > low:
        raise NnsslError(f"--ct_window {low:g} {high:g}: the upper bound must be above the lower one "
                         f"(MIS-FM uses --ct_window -1000 1000).")
    centre, half = (low + high) / 2, (high - low) / 2
    return {"mean": centre, "median": centre, "std": half, "min": low, "max": high,
            "percentile_00_5": low, "percentile_99_5": high}


def _analyze_case(args) -> tuple:
    """One volume -> (shape after crop, spacing, body intensities per channel, relative size after crop)."""
    files, reader_class, num_samples, thresholds, seed = args
    images, properties = reader_class().read_images(files)  # [C, X, Y, Z]
    body = np.zeros(images.shape[1:], dtype=bool)
    for c, threshold in enumerate(thresholds):
        body |= images[c] > threshold if threshold is not None else images[c] != 0
    cropped, seg, _ = crop_to_nonzero(images, body[None].astype(np.int8))
    intensities, _ = DatasetFingerprintExtractor.collect_foreground_intensities(
        seg, cropped, seed=seed, num_samples=num_samples)
    relative = float(np.prod(cropped.shape[1:]) / np.prod(images.shape[1:]))
    return tuple(int(s) for s in cropped.shape[1:]), [float(s) for s in properties["spacing"]], intensities, relative


def body_fingerprint(dataset_full_name: str, num_processes: int = 1, show_progress: bool = True,
                     body_threshold: float = BODY_THRESHOLD_HU, include_test: bool = False) -> dict:
    """Fingerprint the images of a pool (imagesTr; + imagesTs with ``include_test``: the images it is
    pretrained on) without labels; writes and returns it."""
    raw_folder = os.path.join(paths.raw(), dataset_full_name)
    cases, dataset_json = source_images(dataset_full_name, INTASK, include_test)
    channels = dataset_json["channel_names"]
    thresholds = [body_threshold if str(channels[k]).lower() == "ct" else None
                  for k in sorted(channels, key=int)]
    reader = determine_reader_writer_from_dataset_json(dataset_json, next(iter(cases.values()))[0])
    per_case = max(MIN_SAMPLES_PER_CASE, int(TOTAL_INTENSITY_SAMPLES // len(cases)))
    jobs = [(files, reader, per_case, thresholds, i) for i, files in enumerate(cases.values())]
    bar = dict(total=len(jobs), desc=f"Fingerprinting {dataset_full_name} (no labels)", disable=not show_progress)
    if num_processes <= 1:
        results = [_analyze_case(j) for j in tqdm(jobs, **bar)]
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            results = list(tqdm(pool.imap(_analyze_case, jobs, chunksize=4), **bar))
    stats = {}
    for c in range(len(thresholds)):
        values = np.concatenate([np.asarray(r[2][c], dtype=np.float64) for r in results])
        if values.size == 0:
            raise NnsslError(f"No body voxels found in any image of {raw_folder} (channel {c}): every voxel is at "
                             f"or below {body_threshold} HU / zero. Check that the images are CT in HU.")
        p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
        stats[str(c)] = {"mean": float(values.mean()), "median": float(median), "std": float(values.std()),
                         "min": float(values.min()), "max": float(values.max()),
                         "percentile_99_5": float(p995), "percentile_00_5": float(p005)}
    fingerprint = {"spacings": [r[1] for r in results], "shapes_after_crop": [list(r[0]) for r in results],
                   "foreground_intensity_properties_per_channel": stats,
                   "median_relative_size_after_cropping": float(np.median([r[3] for r in results])),
                   "nnssl_generic": {"body_threshold": body_threshold, "num_cases": len(results)}}
    out = os.path.join(paths.preprocessed(), dataset_full_name, "dataset_fingerprint.json")
    write_json(fingerprint, out)
    return fingerprint


def copy_dataset_json(dataset_full_name: str) -> None:
    """The planners and preprocessors read dataset.json from the preprocessed folder too."""
    folder = os.path.join(paths.preprocessed(), dataset_full_name)
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(paths.raw(), dataset_full_name, "dataset.json"), os.path.join(folder, "dataset.json"))


def resolve_spacing(spacing: Union[None, str, Sequence[float]], fingerprint: dict) -> Optional[List[float]]:
    """``None`` (nnU-Net's rule), ``"median"`` or three numbers -> the planner's overwrite_target_spacing."""
    if spacing is None:
        return None
    if isinstance(spacing, str) or (len(spacing) == 1 and str(spacing[0]) == "median"):
        if str(spacing if isinstance(spacing, str) else spacing[0]) != "median":
            raise NnsslError(f"--spacing {spacing}: give three numbers or 'median'.")
        return [float(s) for s in np.median(np.asarray(fingerprint["spacings"], dtype=np.float64), axis=0)]
    try:
        values = [float(s) for s in spacing]
    except ValueError:
        raise NnsslError(f"--spacing {' '.join(map(str, spacing))}: give three positive numbers or 'median'.") from None
    if len(values) != 3 or min(values) <= 0:
        raise NnsslError(f"--spacing {' '.join(map(str, spacing))}: give three positive numbers (one per axis, in "
                         f"the order nnU-Net reads the images) or 'median'.")
    return values


def configure_generic_planner(planner, spacing: Optional[List[float]], ct_window: Tuple[float, float],
                              zscore: bool) -> None:
    """Point an nnU-Net planner (constructed on the pool) at the generic choices before it plans."""
    if spacing is not None:
        planner.overwrite_target_spacing = spacing
    channels = planner.dataset_json["channel_names"]
    if zscore:
        planner.dataset_json = {**planner.dataset_json, "channel_names": {k: "zscore" for k in channels}}
        return
    window = window_intensity_properties(*ct_window)
    props = dict(planner.dataset_fingerprint["foreground_intensity_properties_per_channel"])
    for k, name in channels.items():
        if str(name).lower() == "ct":
            props[str(k)] = dict(window)
    planner.dataset_fingerprint = {**planner.dataset_fingerprint, "foreground_intensity_properties_per_channel": props}


def check_volumes_fit(fingerprint: dict, target_spacing: Sequence[float], patch_size: Sequence[int],
                      transpose_forward: Sequence[int], dataset_full_name: str) -> None:
    """Refuse a pool whose volumes are all smaller than the patch along some axis (pure padding)."""
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=np.float64)
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    resampled = (shapes * spacings / np.asarray(target_spacing, dtype=np.float64)[np.argsort(transpose_forward)])
    resampled = resampled[:, list(transpose_forward)]
    fits = (resampled >= np.asarray(patch_size, dtype=np.float64) - 0.5).all(axis=1)
    if not fits.any():
        largest = tuple(int(v) for v in resampled.max(axis=0))
        raise NnsslError(
            f"Every volume of {dataset_full_name} is smaller than the patch {tuple(int(p) for p in patch_size)} along "
            f"some axis after resampling (largest extent per axis: {largest}), so every crop would be mostly padding. "
            f"Pass a smaller --patch, a coarser --spacing, or add larger volumes.")


def fix_patch(planner, configuration: str, patch: Sequence[int]) -> None:
    """Rewrite a just-written plans file for a fixed ``patch`` (``--patch``): the network its planner
    builds for that patch (``network_for_patch``, the same rule as planning) and nnU-Net's batch size."""
    from nnssl.planning.like import replan_batch_size

    plans_file = planner.plans_file()
    plans = load_json(plans_file)
    cfg = plans["configurations"][configuration]
    patch = [int(p) for p in patch]
    if len(patch) != 3 or min(patch) < 1:
        raise NnsslError(f"--patch {' '.join(map(str, patch))}: give three positive sizes (Z Y X in the plans' axis "
                         f"order).")
    cfg["architecture"] = planner.network_for_patch(patch, cfg["spacing"])
    cfg["patch_size"] = patch
    approx_voxels = float(np.prod(cfg["median_image_size_in_voxels"], dtype=np.float64)) * len(planner.dataset)
    cfg["batch_size"] = replan_batch_size(planner, patch, cfg["architecture"], len(planner.dataset_json["labels"]),
                                          approx_voxels)
    write_json(plans, plans_file)


def plan_and_preprocess_generic(dataset, architectures: Sequence[str] = ("plainconvunet",),
                                spacing: Union[None, str, Sequence] = None,
                                ct_window: Tuple[float, float] = MIS_FM_CT_WINDOW, zscore: bool = False,
                                patch: Optional[Sequence[int]] = None, configuration: str = "3d_fullres", num_processes: int = 1,
                                part: Optional[int] = None, total_parts: Optional[int] = None,
                                verify_dataset_integrity: bool = False, no_pp: bool = False,
                                preset: Optional[str] = None, gpu_memory_target: Optional[float] = None,
                                clean: bool = False, show_progress: bool = True,
                                include_test: bool = False) -> Dict[str, object]:
    """Plan ``dataset`` (a pool) on its own and preprocess its images as its ``intask`` pretraining data
    (imagesTr; + imagesTs with ``include_test``, ``--intask_include_test``: as for any ``-pd intask``).

    Returns ``{"dataset", "plans": {arch: plans file}, "pretraining": {"intask": {configuration: folder}}}``.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnssl import datasets
    from nnssl.architectures import ARCHITECTURES
    from nnssl.dataset_conversion.validation import validate_raw_dataset
    from nnssl.planning.planners import planner_for
    from nnssl.planning.preprocessing import CasePool, check_part, remove_preprocessed
    from nnssl.planning.pretraining_data import preprocess_pretraining, pretraining_data_folder

    paths.ensure_paths()
    check_part(part, total_parts)
    if zscore and tuple(ct_window) != MIS_FM_CT_WINDOW:
        raise NnsslError("--zscore and --ct_window exclude each other: z-scoring ignores the HU window. Pass one.")
    specs = [ARCHITECTURES.get(a) for a in dict.fromkeys(architectures)]
    target = datasets.resolve(dataset, where=("raw",))
    hint = f"nnssl_plan_and_preprocess -d {target} --generic -a {' '.join(s.name for s in specs)}" + (
        " --intask_include_test" if include_test else "")
    fingerprint_file = os.path.join(paths.preprocessed(), target, "dataset_fingerprint.json")
    if part is None:
        validate_raw_dataset(os.path.join(paths.raw(), target), full=verify_dataset_integrity, progress=show_progress)
        existing = load_json(fingerprint_file) if os.path.isfile(fingerprint_file) else {}
        if clean or "nnssl_generic" not in existing:  # a labeled (nnU-Net) fingerprint is redone without labels
            existing = body_fingerprint(target, num_processes, show_progress, include_test=include_test)
        copy_dataset_json(target)
        window = None if zscore else tuple(float(v) for v in ct_window)
        for spec in specs:
            planner = planner_for(spec, target, gpu_memory_target, preset)
            configure_generic_planner(planner, resolve_spacing(spacing, existing), window, zscore)
            print(f"Planning {target} generically for architecture '{spec.name}' ({spec.plans_name})...")
            planner.plan_experiment()
            if patch is not None:
                fix_patch(planner, configuration, patch)
    plans = {s.name: os.path.join(paths.preprocessed(), target, s.plans_name + ".json") for s in specs}
    missing = [f for f in plans.values() if not os.path.isfile(f)]
    if missing:
        raise NnsslError(f"Plans file(s) {', '.join(missing)} do not exist. With --part, plan first: run "
                         f"`{hint} --no_pp` once, then the --part jobs.")
    fingerprint = load_json(fingerprint_file)
    jobs: Dict[str, str] = {}
    for name, plans_file in plans.items():
        pm = PlansManager(plans_file)
        if configuration not in pm.available_configurations:
            raise NnsslError(f"Configuration '{configuration}' (-c) is not in {plans_file}; it has "
                             f"{', '.join(pm.available_configurations)}.")
        cm = pm.get_configuration(configuration)
        check_volumes_fit(fingerprint, cm.spacing, cm.patch_size, pm.transpose_forward, target)
        jobs.setdefault(cm.data_identifier, plans_file)
    result = {"dataset": target, "plans": plans, "pretraining": {INTASK: {}}}
    if no_pp:
        return result
    if clean:
        for data_identifier in jobs:
            remove_preprocessed(pretraining_data_folder(target, INTASK, data_identifier))
    with CasePool(num_processes) as pool:
        for plans_file in jobs.values():
            result["pretraining"][INTASK][configuration] = preprocess_pretraining(
                target, INTASK, plans_file, configuration, pool, part, total_parts, hint, show_progress,
                include_test)
    return result
