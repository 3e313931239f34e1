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
- **Patch** (:func:`cap_patch_to_pool`): nnU-Net caps the patch at the median shape, which for a
  pool mixed from many sources (a 1.5 mm chest CTA next to a thin-slice 512² series) fits no
  volume. Here each axis is capped at a low per-axis percentile of the resampled shapes instead,
  chosen so that at least ``patch_fit_fraction`` (default 0.9) of the volumes hold a whole patch;
  the others are listed and padded with zeros when cropped. Only a pool where no volume holds the
  patch is refused.

A labeled dataset planned with ``--generic`` is treated as a pool: its labels are ignored.
"""
import math
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
# Assumption: the patch of a generic pool fits whole into at least 90 % of its volumes (after
# resampling); nnU-Net's median-shape cap assumes a homogeneous dataset. Field: patch_fit_fraction.
PATCH_FIT_FRACTION = 0.9
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


def resampled_shapes(fingerprint: dict, target_spacing: Sequence[float],
                     transpose_forward: Sequence[int]) -> np.ndarray:
    """[N, 3] shapes of the pool's volumes (after the body crop) resampled to ``target_spacing``, in
    the plans' axis order (``target_spacing`` is in that order too)."""
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=np.float64)
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    resampled = shapes * spacings / np.asarray(target_spacing, dtype=np.float64)[np.argsort(transpose_forward)]
    return resampled[:, list(transpose_forward)]


def fitting_cap(resampled: np.ndarray, fraction: float) -> np.ndarray:
    """[3] the largest per-axis cap of the form "k-th smallest extent per axis" such that at least
    ``fraction`` of the volumes (rows of ``resampled``, [N, 3]) are at least that large on every axis.

    k starts at the (1 - fraction) percentile and goes down until enough volumes hold the cap whole
    (a volume small along one axis and another small along a different one both count against it);
    k = 0 (the smallest extent per axis) fits every volume."""
    if not 0 < fraction <= 1:
        raise NnsslError(f"--patch_fit_fraction {fraction}: give a share of the volumes in (0, 1], e.g. 0.9.")
    ordered = np.sort(resampled, axis=0)
    for k in range(int(math.floor((1 - fraction) * (len(resampled) - 1))), -1, -1):
        if (resampled >= ordered[k]).all(axis=1).mean() >= fraction - 1e-9:
            return ordered[k]
    return ordered[0]


def cap_patch_to_pool(planner, fraction: float = PATCH_FIT_FRACTION) -> None:
    """Make ``planner`` (on a pool) plan 3D patches that ``fraction`` of the volumes hold whole.

    nnU-Net's planners cap the patch at the median shape they are given; they are given
    min(median, :func:`fitting_cap`) instead, lowered further where rounding to the network's
    divisor went above the cap. The plans keep the true median shape. Where the network cannot be
    that small (an nnssl planner refuses), the median shape is used and
    :func:`check_volumes_fit` reports the volumes that are padded."""
    plan_for = planner.get_plans_for_configuration

    def capped(spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache):
        if len(spacing) != 3:
            return plan_for(spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache)
        transpose_forward = planner.determine_transpose()[0]
        cap = np.floor(fitting_cap(resampled_shapes(planner.dataset_fingerprint, spacing, transpose_forward),
                                   fraction))
        limit = np.minimum(np.asarray(median_shape, dtype=np.float64)[:3], cap)
        try:
            for _ in range(8):  # nnU-Net rounds the patch up to its divisor: take the excess off the limit
                plan = plan_for(spacing, limit, data_identifier, approximate_n_voxels_dataset, _cache)
                excess = np.asarray(plan["patch_size"], dtype=np.float64) - cap
                if (excess <= 0).all():
                    break
                limit = np.maximum(limit - np.maximum(excess, 0), 1)
        except NnsslError:  # no network of this architecture is that small: plan for the median shape
            plan = plan_for(spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache)
        plan["median_image_size_in_voxels"] = median_shape
        return plan

    planner.get_plans_for_configuration = capped


def check_volumes_fit(fingerprint: dict, target_spacing: Sequence[float], patch_size: Sequence[int],
                      transpose_forward: Sequence[int], dataset_full_name: str,
                      case_names: Optional[Sequence[str]] = None) -> List[int]:
    """Refuse a pool whose volumes are all smaller than the patch along some axis (pure padding);
    otherwise print the volumes that are smaller (padded with zeros when cropped) and return
    their indices."""
    resampled = resampled_shapes(fingerprint, target_spacing, transpose_forward)
    fits = (resampled >= np.asarray(patch_size, dtype=np.float64) - 0.5).all(axis=1)
    patch = tuple(int(p) for p in patch_size)
    if not fits.any():
        largest = tuple(int(v) for v in resampled.max(axis=0))
        raise NnsslError(
            f"Every volume of {dataset_full_name} is smaller than the patch {patch} along "
            f"some axis after resampling (largest extent per axis: {largest}), so every crop would be mostly padding. "
            f"Pass a smaller --patch, a coarser --spacing, or add larger volumes.")
    small = [int(i) for i in np.flatnonzero(~fits)]
    if small:
        names = list(case_names) if case_names is not None and len(case_names) == len(fits) else \
            [f"volume {i}" for i in range(len(fits))]
        listed = ", ".join(f"{names[i]} {tuple(int(round(v)) for v in resampled[i])}" for i in small[:10])
        print(f"nnssl: {len(small)} of {len(fits)} volume(s) of {dataset_full_name} are smaller than the patch {patch} "
              f"along some axis after resampling; they are kept and padded with zeros to the patch when cropped: "
              f"{listed}{' ...' if len(small) > 10 else ''}")
    return small


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
                                include_test: bool = False,
                                patch_fit_fraction: float = PATCH_FIT_FRACTION) -> Dict[str, object]:
    """Plan ``dataset`` (a pool) on its own and preprocess its images as its ``intask`` pretraining data
    (imagesTr; + imagesTs with ``include_test``, ``--intask_include_test``: as for any ``-pd intask``).

    ``patch_fit_fraction``: share of the volumes that must hold a whole planned patch (see
    :func:`cap_patch_to_pool`; not used with a fixed ``patch``).

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
    fitting_cap(np.ones((1, 3)), patch_fit_fraction)  # refuses a fraction outside (0, 1] before any work
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
            if patch is None:
                cap_patch_to_pool(planner, patch_fit_fraction)
            print(f"Planning {target} generically for architecture '{spec.name}' ({spec.plans_name})...")
            planner.plan_experiment()
            if patch is not None:
                fix_patch(planner, configuration, patch)
            else:  # recorded with the plans it shaped
                written = load_json(planner.plans_file())
                write_json({**written, "nnssl_patch_fit_fraction": float(patch_fit_fraction)}, planner.plans_file())
    plans = {s.name: os.path.join(paths.preprocessed(), target, s.plans_name + ".json") for s in specs}
    missing = [f for f in plans.values() if not os.path.isfile(f)]
    if missing:
        raise NnsslError(f"Plans file(s) {', '.join(missing)} do not exist. With --part, plan first: run "
                         f"`{hint} --no_pp` once, then the --part jobs.")
    fingerprint = load_json(fingerprint_file)
    case_names = list(source_images(target, INTASK)[0])
    jobs: Dict[str, str] = {}
    for name, plans_file in plans.items():
        pm = PlansManager(plans_file)
        if configuration not in pm.available_configurations:
            raise NnsslError(f"Configuration '{configuration}' (-c) is not in {plans_file}; it has "
                             f"{', '.join(pm.available_configurations)}.")
        cm = pm.get_configuration(configuration)
        check_volumes_fit(fingerprint, cm.spacing, cm.patch_size, pm.transpose_forward, target, case_names)
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
