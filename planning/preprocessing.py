"""Resumable, shardable, atomic preprocessing of cases with nnU-Net's preprocessor.

The per-case work is nnU-Net's (``DefaultPreprocessor.run_case_save`` for labeled cases,
``run_case`` + ``nnUNetDatasetBlosc2.save_case`` for unlabeled ones), so the files are the
ones ``nnUNetv2_preprocess`` writes and nnU-Net's loaders read them. The orchestration is
nnssl's, because nnU-Net's ``run`` deletes the output folder first:

- a case is written into a hidden temporary folder inside the output folder
  (``.tmp-<random>-<case>/``; nnU-Net's loaders list files, so they never see it) and its
  ``.b2nd``, ``_seg.b2nd`` and ``.pkl`` are renamed into place, the ``.pkl`` last: a case is
  finished when all three exist, and an interrupted run leaves no finished-looking half case;
- finished cases are skipped, so rerunning the command resumes;
- ``--part K --total_parts N`` processes the sorted case identifiers ``[K::N]``, so parts of
  a cluster array never touch the same case (running all parts equals one run);
- a sidecar ``<folder>.nnssl_signature.json`` records what the data depends on (spacing,
  transpose, normalization and its statistics, resampling), so resuming into data made with
  other plans is refused instead of silently mixing the two.
"""
import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
from tqdm import tqdm

from nnssl import paths
from nnssl.errors import NnsslError
from nnssl.io import atomic_path, write_json

SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")  # renamed in this order: the .pkl marks a finished case
TMP_PREFIX = ".tmp-"
_TMP_TOKEN_LEN = 8


@dataclass(frozen=True)
class CaseJob:
    identifier: str
    image_files: Tuple[str, ...]  # one file per channel
    seg_file: Optional[str]  # None: unlabeled; nnU-Net's nonzero mask (0 inside, -1 outside) becomes the seg


@dataclass
class CaseWriter:
    """Everything needed to preprocess cases into ``output_folder`` (small: sent with every task)."""
    plans_manager: PlansManager
    configuration_manager: ConfigurationManager
    dataset_json: dict
    output_folder: str

    def process(self, job: CaseJob) -> str:
        tmp_dir = os.path.join(self.output_folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:_TMP_TOKEN_LEN]}-{job.identifier}")
        os.makedirs(tmp_dir)
        try:
            truncated = os.path.join(tmp_dir, job.identifier)
            preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
            if job.seg_file is not None:
                preprocessor.run_case_save(truncated, list(job.image_files), job.seg_file, self.plans_manager,
                                           self.configuration_manager, self.dataset_json)
            else:
                self._save_unlabeled(preprocessor, truncated, list(job.image_files))
            for suffix in SUFFIXES:
                os.replace(truncated + suffix, os.path.join(self.output_folder, job.identifier + suffix))
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return job.identifier

    def _save_unlabeled(self, preprocessor, truncated: str, image_files: List[str]) -> None:
        """Like ``run_case_save``, without labels: data [C, X, Y, Z] float32, seg [1, X, Y, Z] int16 (0 / -1)."""
        cm = self.configuration_manager
        data, seg, properties = preprocessor.run_case(image_files, None, self.plans_manager, cm, self.dataset_json)
        properties["class_locations"] = {}  # nnU-Net's loader looks for it; no foreground to oversample
        data = data.astype(np.float32, copy=False)
        seg = seg.astype(np.int16, copy=False)
        blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, properties, truncated, chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)


# --------------------------------------------------------------------------- sharding and resume


def check_part(part: Optional[int], total_parts: Optional[int]) -> None:
    if part is None and total_parts is None:
        return
    if part is None or total_parts is None:
        raise NnsslError("--part and --total_parts go together: --part K --total_parts N runs part K of N "
                         "(K = 0 .. N-1). Give both, or neither to process everything.")
    if total_parts < 1 or not 0 <= part < total_parts:
        raise NnsslError(f"--part {part} --total_parts {total_parts} is out of range: --total_parts must be >= 1 "
                         f"and --part between 0 and {max(total_parts - 1, 0)}.")


def select_part(identifiers: Iterable[str], part: Optional[int], total_parts: Optional[int]) -> List[str]:
    """The sorted identifiers of part ``part`` of ``total_parts`` (all of them without parts)."""
    ids = sorted(identifiers)
    return ids if part is None else ids[part::total_parts]


def finished_cases(folder: str) -> Set[str]:
    """Identifiers whose three output files all exist in ``folder``."""
    if not os.path.isdir(folder):
        return set()
    names = set(os.listdir(folder))
    return {n[: -len(".pkl")] for n in names if n.endswith(".pkl")
            and all(n[: -len(".pkl")] + s in names for s in SUFFIXES)}


def _clean_stale_temps(folder: str, own: Set[str], known: Set[str]) -> None:
    """Remove temporary case folders left by killed runs: this part's cases, and cases no part has.

    Temporaries of other parts' cases are left alone: those parts may be running right now.
    """
    for name in os.listdir(folder):
        if not name.startswith(TMP_PREFIX):
            continue
        identifier = name[len(TMP_PREFIX) + _TMP_TOKEN_LEN + 1:]
        if identifier in own or identifier not in known:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# --------------------------------------------------------------------------- plans signature


def preprocessing_signature(plans_manager: PlansManager, configuration_manager: ConfigurationManager) -> dict:
    """What the preprocessed arrays depend on (not the patch size: it only changes blosc2 chunking)."""
    c = configuration_manager.configuration
    sig = {
        "data_identifier": configuration_manager.data_identifier,
        "transpose_forward": plans_manager.transpose_forward,
        "foreground_intensity_properties_per_channel": plans_manager.foreground_intensity_properties_per_channel,
        **{k: c.get(k) for k in ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                                 "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs",
                                 "preprocessor_name")},
    }
    return json.loads(json.dumps(sig))  # normalized: tuples -> lists, numpy scalars are already floats in plans


def signature_file(folder: str) -> str:
    return os.path.normpath(folder) + ".nnssl_signature.json"


def ensure_signature(folder: str, signature: dict, rerun_hint: str) -> None:
    """Record the signature of new data, or refuse to add to data made with other plans."""
    path = signature_file(folder)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != signature:
            differ = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
            raise NnsslError(
                f"{folder} holds data preprocessed with other plans (they differ in: {', '.join(differ)}). "
                f"Delete that folder (and {path}), or rerun `{rerun_hint} --clean`, to preprocess it again.")
        return
    # Assumption: data already in a folder without signature (e.g. written by nnUNetv2_preprocess) was
    # made with the current plans, as nnU-Net itself assumes.
    write_json(signature, path)


def remove_preprocessed(folder: str) -> None:
    """Delete a preprocessed data folder and its signature (for --clean)."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    if os.path.isfile(signature_file(folder)):
        os.remove(signature_file(folder))


# --------------------------------------------------------------------------- running cases


class CasePool:
    """The worker processes of one command, shared by all its ``run_cases`` calls.

    ``with CasePool(n) as pool``. One process works in-process (no worker start-up); more use a
    spawn pool like nnU-Net's, started on first use (a fully resumed run starts none) and reused
    for the labeled data and every -pd source (worker start-up, i.e. importing torch and nnU-Net,
    is paid once). Each task carries its small ``CaseWriter``.
    """

    def __init__(self, num_processes: int):
        self.num_processes = int(num_processes)
        self._executor: Optional[ProcessPoolExecutor] = None

    def __enter__(self) -> "CasePool":
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def run(self, writer: CaseWriter, todo: Sequence[CaseJob], bar: tqdm) -> None:
        if self.num_processes <= 1 or len(todo) <= 1:
            for job in todo:
                try:
                    writer.process(job)
                except NnsslError:
                    raise
                except Exception as e:
                    raise _case_error(job, e) from e
                bar.update()
            return
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self.num_processes, mp_context=get_context("spawn"))
        futures = {self._executor.submit(writer.process, job): job for job in todo}
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except BrokenProcessPool as e:  # a worker died without an exception: usually out of memory
                    raise NnsslError("A preprocessing worker process died (most likely out of memory). Rerun with "
                                     "fewer processes (-np); finished cases are kept.") from e
                except NnsslError:
                    raise
                except Exception as e:
                    raise _case_error(futures[future], e) from e
                bar.update()
        finally:
            for future in futures:
                future.cancel()  # after an error: do not start the remaining cases


def _case_error(job: CaseJob, e: BaseException) -> NnsslError:
    files = ", ".join(job.image_files) + (f", {job.seg_file}" if job.seg_file else "")
    return NnsslError(f"Preprocessing case '{job.identifier}' ({files}) failed: {type(e).__name__}: {e}. Check "
                      f"these files (rerun with --verify_dataset_integrity for a full check); finished cases are "
                      f"kept, so rerunning resumes.")


def run_cases(writer: CaseWriter, jobs: Sequence[CaseJob], all_identifiers: Iterable[str], pool: CasePool,
              desc: str, show_progress: bool = True) -> Tuple[int, int]:
    """Preprocess the unfinished ``jobs`` into ``writer.output_folder``; returns (processed, skipped).

    ``all_identifiers``: every case of the dataset (all parts), to tell stale temporaries apart.
    """
    os.makedirs(writer.output_folder, exist_ok=True)
    _clean_stale_temps(writer.output_folder, {j.identifier for j in jobs}, set(all_identifiers))
    done = finished_cases(writer.output_folder)
    todo = [j for j in jobs if j.identifier not in done]
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"{desc}: {skipped} of {len(jobs)} cases already preprocessed, skipping them.")
    with tqdm(total=len(todo), desc=desc, disable=not show_progress) as bar:
        pool.run(writer, todo, bar)
    return len(todo), skipped


def copy_ground_truth(labels: Sequence[Tuple[str, str]], gt_folder: str, file_ending: str) -> None:
    """Copy label files to ``gt_folder/<case><file_ending>`` (like nnU-Net: only when new or changed).

    labels: (identifier, label file) pairs. nnU-Net's validation reads them from there, so
    training works even where only the preprocessed folder exists.
    """
    os.makedirs(gt_folder, exist_ok=True)
    for identifier, src in labels:
        dst = os.path.join(gt_folder, identifier + file_ending)
        if os.path.isfile(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            continue
        with atomic_path(dst) as tmp:
            shutil.copy2(src, tmp)  # keeps the mtime, which the check above relies on


# --------------------------------------------------------------------------- the labeled dataset


def preprocess_labeled(dataset_full_name: str, plans_file: str, configuration: str, pool: CasePool,
                       part: Optional[int] = None, total_parts: Optional[int] = None, rerun_hint: str = "",
                       show_progress: bool = True) -> str:
    """Preprocess the training cases (imagesTr + labelsTr) of a dataset with one configuration of a plans file.

    Writes ``$nnUNet_preprocessed/<dataset>/<data_identifier>/`` and copies the labels to
    ``gt_segmentations/``; returns the data folder. Needs the planner's copy of dataset.json.
    """
    pp_dataset = os.path.join(paths.preprocessed(), dataset_full_name)
    plans_manager = PlansManager(plans_file)
    cm = plans_manager.get_configuration(configuration)
    dataset_json = load_json(os.path.join(pp_dataset, "dataset.json"))
    cases = get_filenames_of_train_images_and_targets(os.path.join(paths.raw(), dataset_full_name), dataset_json)
    own = select_part(cases, part, total_parts)
    folder = os.path.join(pp_dataset, cm.data_identifier)
    ensure_signature(folder, preprocessing_signature(plans_manager, cm), rerun_hint)
    writer = CaseWriter(plans_manager, cm, dataset_json, folder)
    jobs = [CaseJob(k, tuple(cases[k]["images"]), cases[k]["label"]) for k in own]
    run_cases(writer, jobs, cases.keys(), pool, f"Preprocessing {dataset_full_name} {configuration}",
              show_progress)
    copy_ground_truth([(k, cases[k]["label"]) for k in own], os.path.join(pp_dataset, "gt_segmentations"),
                      dataset_json["file_ending"])
    return folder
