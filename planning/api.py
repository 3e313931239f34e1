"""``plan_and_preprocess``: fingerprint, plan (one plans file per architecture) and preprocess.

Stages (what ``nnssl_plan_and_preprocess`` runs):

1. check the raw dataset(s) (headers always; every voxel with ``verify_dataset_integrity``);
2. fingerprint the target with nnU-Net's ``DatasetFingerprintExtractor`` (kept if it exists,
   unless ``clean``);
3. plan with each architecture's planner (each writes its own plans file; all share the
   ``nnUNetPlans_3d_fullres`` data);
4. preprocess the labeled training cases once per distinct data identifier, and each ``-pd``
   source with the first architecture's plans.

With ``part``/``total_parts`` only stage 4 runs, on that part's cases: the plans must
already exist (``--no_pp`` makes them), so the jobs of a cluster array never race on them.
"""
import functools
import inspect
import json
import os
from typing import Dict, List, Optional, Sequence

from nnunetv2.configuration import default_num_processes
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnssl import datasets, locks, paths
from nnssl.architectures import ARCHITECTURES
from nnssl.dataset_conversion.validation import validate_raw_dataset
from nnssl.errors import NnsslError
from nnssl.planning.planners import planner_for
from nnssl.planning.preprocessing import CasePool, check_part, preprocess_labeled, remove_preprocessed
from nnssl.planning.pretraining_data import (INTASK, check_source, is_own_images, preprocess_pretraining,
                                             pretraining_data_folder)

DEFAULT_CONFIGURATIONS = ("3d_fullres",)


def _one_writer(fn):
    """Run ``fn`` as the only writer of ``nnUNet_preprocessed/<Dataset>`` (:mod:`nnssl.locks`).

    The ``--part`` jobs of a cluster array write disjoint cases and run together: each holds its
    own lock, and a whole-dataset run and a part run exclude each other."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        part, total_parts = bound.get("part"), bound.get("total_parts")
        paths.ensure_paths()
        folder = os.path.join(paths.preprocessed(), datasets.resolve(bound["dataset"], where=("raw",)))
        what = f"The preprocessed dataset {folder}"
        name = locks.LOCK_NAME if part is None else f".nnssl.part-{part}-of-{total_parts}.lock"
        with locks.exclusive(folder, what, name):
            others = ([os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith(".nnssl.part-")]
                      if part is None else [os.path.join(folder, locks.LOCK_NAME)])
            locks.refuse_if_locked(others, what)
            return fn(*args, **kwargs)
    return locked


@_one_writer
def plan_and_preprocess(dataset, architectures: Sequence[str] = ("plainconvunet",),
                        pretraining: Sequence[str] = (), configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
                        num_processes: Optional[int] = None, part: Optional[int] = None,
                        total_parts: Optional[int] = None, verify_dataset_integrity: bool = False,
                        no_pp: bool = False, preset: Optional[str] = None,
                        gpu_memory_target: Optional[float] = None, clean: bool = False,
                        show_progress: bool = True, generic: bool = False, spacing=None,
                        ct_window=None, zscore: bool = False, patch=None, like: Optional[str] = None,
                        intask_include_test: bool = False,
                        patch_fit_fraction: Optional[float] = None) -> Dict[str, object]:
    """Plan and preprocess ``dataset`` (ID, full or short name); returns what was written:
    ``{"dataset", "plans": {arch: plans file}, "data": {data_identifier: folder},
    "pretraining": {source: {configuration: folder}}}``.

    ``generic``: plan an unlabeled pool on its own (``planning/generic.py``; ``spacing``,
    ``ct_window``, ``zscore``, ``patch``, ``patch_fit_fraction`` apply). ``like``: plan the labeled
    ``dataset`` like a pretraining checkpoint or model archive (``planning/like.py``) instead of with
    ``architectures``.
    ``intask_include_test``: the target's (or the pool's) imagesTs join its ``intask`` pretraining data
    (``planning/pretraining_data.py``; warned and recorded).
    """
    if generic or spacing is not None or ct_window is not None or zscore or patch is not None or \
            patch_fit_fraction is not None:
        if not generic:
            raise NnsslError("--spacing, --ct_window, --zscore, --patch and --patch_fit_fraction plan an unlabeled "
                             "pool on its own: add --generic (a labeled dataset is planned by nnU-Net's rules, or "
                             "--like a checkpoint).")
        if like is not None or pretraining:
            raise NnsslError("--generic plans the pool itself (its images are its pretraining data): drop --like/-pd.")
        from nnssl.planning.generic import MIS_FM_CT_WINDOW, PATCH_FIT_FRACTION, plan_and_preprocess_generic

        return plan_and_preprocess_generic(
            dataset, architectures, spacing=spacing, ct_window=ct_window or MIS_FM_CT_WINDOW, zscore=zscore,
            patch=patch, configuration=configurations[0],
            num_processes=default_num_processes if num_processes is None else int(num_processes), part=part,
            total_parts=total_parts, verify_dataset_integrity=verify_dataset_integrity, no_pp=no_pp, preset=preset,
            gpu_memory_target=gpu_memory_target, clean=clean, show_progress=show_progress,
            include_test=intask_include_test,
            patch_fit_fraction=PATCH_FIT_FRACTION if patch_fit_fraction is None else float(patch_fit_fraction))
    paths.ensure_paths()
    num_processes = default_num_processes if num_processes is None else int(num_processes)
    if num_processes < 1:
        raise NnsslError(f"-np {num_processes}: the number of processes must be at least 1.")
    check_part(part, total_parts)
    if clean and part is not None:
        raise NnsslError("--clean cannot be combined with --part: parts run at the same time and must not delete "
                         "each other's data. Run `nnssl_plan_and_preprocess ... --clean --no_pp` once, then the parts.")
    specs = [ARCHITECTURES.get(a) for a in dict.fromkeys(architectures)]
    if not specs:
        raise NnsslError("-a needs at least one architecture; choose from: " + ", ".join(ARCHITECTURES.names()))
    if preset is not None:
        for spec in specs:
            spec.planner_class().preset_overrides(preset)  # raises NnsslError naming the available presets
    target = datasets.resolve(dataset, where=("raw",))
    sources = [INTASK if s == INTASK else datasets.resolve(s, where=("raw",)) for s in dict.fromkeys(pretraining)]
    if intask_include_test and not any(is_own_images(target, s) for s in sources):
        raise NnsslError(f"--intask_include_test adds {target}'s imagesTs to its in-task pretraining data, but no -pd "
                         f"names it: add -pd intask (or drop the flag).")
    for source in sources:  # cheap checks first: fail before any long work
        check_source(target, source, intask_include_test)
    if like is not None:  # a damaged or foreign-but-unreadable checkpoint, before fingerprinting
        from nnssl.checkpoints import load_pretraining_checkpoint
        load_pretraining_checkpoint(like)
    rerun_hint = _command(target, specs, sources, configurations, preset) + (
        " --intask_include_test" if intask_include_test else "")

    if part is None or verify_dataset_integrity:
        _validate(target, [s for s in sources if s != INTASK], verify_dataset_integrity, show_progress)
    if part is None:
        _fingerprint(target, num_processes, clean, show_progress)
        if like is None:
            for spec in specs:
                _plan(spec, target, gpu_memory_target, preset)
    if like is not None:
        return _preprocess_like(target, like, configurations, num_processes, part, total_parts, gpu_memory_target,
                                show_progress)
    plans = _plans_files(target, specs, rerun_hint)
    data_jobs, pretrain_configs = _configuration_jobs(target, specs, plans, configurations)
    if sources and not pretrain_configs:
        raise NnsslError(f"-pd data is preprocessed with the plans of the first architecture (-a {specs[0].name}), "
                         f"which have none of the configurations {', '.join(configurations)} (-c). Put an "
                         f"architecture that has them first, or choose another -c.")
    pretrain_plans = plans[specs[0].name]
    if clean:
        for data_identifier in data_jobs:
            remove_preprocessed(os.path.join(paths.preprocessed(), target, data_identifier))
        for source in sources:
            for c in pretrain_configs:
                remove_preprocessed(pretraining_data_folder(target, source, _data_identifier(pretrain_plans, c)))

    result = {"dataset": target, "plans": plans, "data": {}, "pretraining": {s: {} for s in sources}}
    if no_pp:
        return result
    with CasePool(num_processes) as pool:
        for data_identifier, (plans_file, c) in data_jobs.items():
            result["data"][data_identifier] = preprocess_labeled(
                target, plans_file, c, pool, part, total_parts, rerun_hint, show_progress)
        for source in sources:
            for c in pretrain_configs:
                result["pretraining"][source][c] = preprocess_pretraining(
                    target, source, pretrain_plans, c, pool, part, total_parts, rerun_hint, show_progress,
                    intask_include_test)
    return result


def _preprocess_like(target: str, checkpoint: str, configurations: Sequence[str], num_processes: int,
                     part: Optional[int], total_parts: Optional[int], gpu_memory_target: Optional[float],
                     show_progress: bool) -> Dict[str, object]:
    """Plans like the checkpoint (written once; parts reuse them) and the labeled data preprocessed with them."""
    from nnssl.planning.like import like_plans_file, write_like_plans

    plans_file = like_plans_file(target, checkpoint)
    hint = f"nnssl_plan_and_preprocess -d {target} --like {checkpoint}"
    if part is None:
        plans_file = write_like_plans(target, checkpoint, gpu_memory_target)
    elif not os.path.isfile(plans_file):
        raise NnsslError(f"Plans file {plans_file} does not exist. With --part, plan first: run `{hint} --no_pp` once.")
    pm = PlansManager(plans_file)
    result = {"dataset": target, "plans": {"like": plans_file}, "data": {}, "pretraining": {}}
    with CasePool(num_processes) as pool:
        for c in (c for c in configurations if c in pm.available_configurations):
            result["data"][pm.get_configuration(c).data_identifier] = preprocess_labeled(
                target, plans_file, c, pool, part, total_parts, hint, show_progress)
    return result


def _command(target: str, specs, sources: Sequence[str], configurations: Sequence[str], preset: Optional[str]) -> str:
    """The command line that redoes this run (for messages)."""
    cmd = f"nnssl_plan_and_preprocess -d {target} -a {' '.join(s.name for s in specs)}"
    if sources:
        cmd += f" -pd {' '.join(sources)}"
    if tuple(configurations) != DEFAULT_CONFIGURATIONS:
        cmd += f" -c {' '.join(configurations)}"
    return cmd + (f" --preset {preset}" if preset else "")


def _validate(target: str, sources: Sequence[str], full: bool, show_progress: bool) -> None:
    for name in [target, *sources]:
        validate_raw_dataset(os.path.join(paths.raw(), name), full=full, progress=show_progress)


def _fingerprint(target: str, num_processes: int, clean: bool, show_progress: bool) -> None:
    fingerprint = os.path.join(paths.preprocessed(), target, "dataset_fingerprint.json")
    try:  # nnU-Net writes it non-atomically: redo a truncated one instead of trusting it
        with open(fingerprint, encoding="utf-8") as f:
            redo = clean or "spacings" not in json.load(f)
    except (OSError, ValueError):
        redo = True
    if not redo:
        print(f"Using the existing fingerprint {fingerprint} (--clean recomputes it).")
        return
    extractor = DatasetFingerprintExtractor(target, num_processes, verbose=False)
    extractor.show_progress_bar = show_progress
    extractor.run(overwrite_existing=True)


def _plan(spec, target: str, gpu_memory_target: Optional[float], preset: Optional[str]) -> None:
    print(f"Planning {target} for architecture '{spec.name}' ({spec.plans_name})...")
    planner_for(spec, target, gpu_memory_target, preset).plan_experiment()


def _plans_files(target: str, specs, rerun_hint: str) -> Dict[str, str]:
    plans = {spec.name: os.path.join(paths.preprocessed(), target, spec.plans_name + ".json") for spec in specs}
    missing = [f for f in plans.values() if not os.path.isfile(f)]
    if missing:
        raise NnsslError(f"Plans file(s) {', '.join(missing)} do not exist. With --part, planning must be done "
                         f"beforehand: run `{rerun_hint} --no_pp` once, then the --part jobs.")
    return plans


def _data_identifier(plans_file: str, configuration: str) -> str:
    return PlansManager(plans_file).get_configuration(configuration).data_identifier


def _configuration_jobs(target: str, specs, plans: Dict[str, str], configurations: Sequence[str]):
    """({data_identifier: (plans file, configuration)} to preprocess once each, [configurations for -pd])."""
    available = {spec.name: PlansManager(plans[spec.name]).available_configurations for spec in specs}
    jobs: Dict[str, tuple] = {}
    for c in dict.fromkeys(configurations):
        having = [s for s in specs if c in available[s.name]]
        if not having:
            listing = "; ".join(f"{s.plans_name}: {', '.join(available[s.name])}" for s in specs)
            raise NnsslError(f"Configuration '{c}' (-c) is in none of the plans of {target} ({listing}). "
                             f"Choose one of those.")
        for s in specs:
            if s not in having:
                print(f"nnssl: note: {s.plans_name} has no configuration '{c}'; it is not preprocessed for '{s.name}'.")
        for s in having:  # plans sharing a data identifier are preprocessed once, with the first of them
            jobs.setdefault(_data_identifier(plans[s.name], c), (plans[s.name], c))
    pretrain_configs: List[str] = [c for c in dict.fromkeys(configurations) if c in available[specs[0].name]]
    return jobs, pretrain_configs


def details_log(dataset) -> str:
    """Where nnU-Net's planning printouts (plans dictionaries, configurations) of ``dataset`` go when the
    console is quiet (``nnssl_plan_and_preprocess`` without ``--verbose``, the demo)."""
    paths.ensure_paths()
    return os.path.join(paths.preprocessed(), datasets.resolve(dataset, where=("raw",)),
                        "nnssl_plan_and_preprocess.log")


def plans_summary(plans_file: str) -> List[str]:
    """One line per configuration of a plans file: patch size, batch size, spacing, network class."""
    pm = PlansManager(plans_file)
    lines = []
    for c in pm.available_configurations:
        cm = pm.get_configuration(c)
        spacing = ", ".join(f"{float(s):.3g}" for s in cm.spacing)
        lines.append(f"{os.path.basename(plans_file)} {c}: patch {list(map(int, cm.patch_size))}, batch "
                     f"{cm.batch_size}, spacing [{spacing}], {cm.network_arch_class_name.rsplit('.', 1)[-1]}")
    return lines
