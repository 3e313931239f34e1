"""Pretraining data (``-pd``): unlabeled images preprocessed with the TARGET dataset's plans.

An unlabeled dataset has no foreground labels, so it cannot be fingerprinted for CT
normalization; instead its images are resampled to the target's spacing, transposed like the
target and normalized with the target's intensity statistics, so pretraining sees exactly
what fine-tuning sees (SPEC §4, "target-planned"). Layout::

    $nnUNet_preprocessed/<Target>/nnsslPretrain__<Source full name | intask>__<data_identifier>/
        <case>.b2nd, <case>_seg.b2nd, <case>.pkl   (nnU-Net's blosc2 format; seg = nonzero mask 0/-1)
        nnsslPretrain_manifest.json                (written at the end of every run or part)

``intask`` is the target's own training images (imagesTr), without labels. Its imagesTs are
evaluation images: LWI pretrains on "the same training dataset" it segments, HybridMIM on the
training set "to avoid data leakage"; so they join (with a ``Ts__`` prefix) only with ``include_test``
(``--intask_include_test``), which warns and is recorded in the manifest. The same holds when
``-pd`` names the target itself. Any other source is a raw dataset (ideally marked
``"nnssl_unlabeled": true``); only its images are used (imagesTr and imagesTs, the latter
prefixed ``Ts__``).

The manifest lists the cases (sorted) that make up the data; loaders use that list, so files of
cases that no longer belong (e.g. imagesTs left from an earlier ``--intask_include_test`` run)
are ignored.

Note for loaders: the manifest sits in the data folder, so read it with
``nnUNetDatasetBlosc2`` directly rather than nnU-Net's ``infer_dataset_class`` (which expects
only data files there).
"""
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import (
    create_lists_from_splitted_dataset_folder,
    get_filenames_of_train_images_and_targets,
    get_identifiers_from_splitted_dataset_folder,
)

from nnssl import paths
from nnssl.errors import NnsslError
from nnssl.io import write_json
from nnssl.planning.preprocessing import (
    CaseJob,
    CasePool,
    CaseWriter,
    ensure_signature,
    finished_cases,
    preprocessing_signature,
    run_cases,
    select_part,
)

INTASK = "intask"
FOLDER_PREFIX = "nnsslPretrain"
MANIFEST = "nnsslPretrain_manifest.json"
TEST_CASE_PREFIX = "Ts__"  # imagesTs identifiers may repeat imagesTr ones


def pretraining_data_folder(target_full_name: str, source: str, data_identifier: str) -> str:
    """Where ``-pd source`` is preprocessed under the target's ``data_identifier`` (source: full name or intask)."""
    return os.path.join(paths.preprocessed(), target_full_name, f"{FOLDER_PREFIX}__{source}__{data_identifier}")


def is_own_images(target_full_name: str, source: str) -> bool:
    """Whether ``-pd source`` is the target's own images (``intask`` or the target's name)."""
    return source in (INTASK, target_full_name)


def source_images(target_full_name: str, source: str,
                  include_test: bool = False) -> Tuple[Dict[str, List[str]], dict]:
    """{identifier: [channel files]} of a pretraining source and its dataset.json: imagesTr, plus the
    imagesTs (prefixed ``Ts__``) of another dataset, or of the target's own only with ``include_test``."""
    raw_folder = os.path.join(paths.raw(), target_full_name if source == INTASK else source)
    dataset_json = load_json(os.path.join(raw_folder, "dataset.json"))
    train = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)  # label paths are ignored
    cases = {k: list(v["images"]) for k, v in train.items()}
    test_folder = os.path.join(raw_folder, "imagesTs")
    if os.path.isdir(test_folder) and (include_test or not is_own_images(target_full_name, source)):
        ids = get_identifiers_from_splitted_dataset_folder(test_folder, dataset_json["file_ending"])
        files = create_lists_from_splitted_dataset_folder(test_folder, dataset_json["file_ending"], ids)
        cases.update({TEST_CASE_PREFIX + k: list(v) for k, v in zip(ids, files)})
    if not cases:
        raise NnsslError(f"Pretraining dataset '{source}' has no images in {raw_folder}/imagesTr or imagesTs "
                         f"(files CASE_0000{dataset_json['file_ending']}). Add images or pick another -pd dataset.")
    if source != INTASK and _has_labels(raw_folder, dataset_json):
        print(f"nnssl: note: -pd {source} is a labeled dataset; only its images are used for pretraining "
              f"(mark unlabeled datasets with \"nnssl_unlabeled\": true in dataset.json).", file=sys.stderr)
    return cases, dataset_json


def _has_labels(raw_folder: str, dataset_json: dict) -> bool:
    if dataset_json.get("nnssl_unlabeled"):
        return False
    labels_tr = os.path.join(raw_folder, "labelsTr")
    return len(dataset_json.get("labels", {})) > 1 or (os.path.isdir(labels_tr) and bool(os.listdir(labels_tr)))


def _check_channels(source: str, target: str, cases: Dict[str, List[str]], source_json: dict,
                    target_json: dict) -> None:
    n_target, n_source = len(target_json["channel_names"]), len(source_json["channel_names"])
    if n_source != n_target:
        raise NnsslError(f"-pd {source} has {n_source} channel(s) ({source_json['channel_names']}) but the target "
                         f"{target} has {n_target} ({target_json['channel_names']}); pretraining data must have the "
                         f"target's channels. Pick a -pd dataset with matching channels.")
    for identifier, files in cases.items():
        if len(files) != n_target:
            raise NnsslError(f"Case '{identifier}' of -pd {source} has {len(files)} channel file(s), expected "
                             f"{n_target} (CASE_0000..{n_target - 1:04d}). Add or remove files.")


def _reader_plans(plans_manager: PlansManager, source_json: dict, example_file: str) -> PlansManager:
    """The target's plans, reading the source with the target's image reader where it can (same
    axis conventions), else with the reader nnU-Net picks for the source's file type."""
    rw = plans_manager.image_reader_writer_class
    if any(example_file.lower().endswith(e.lower()) for e in rw.supported_file_endings):
        return plans_manager
    other = determine_reader_writer_from_dataset_json(source_json, example_file)
    return PlansManager({**plans_manager.plans, "image_reader_writer": other.__name__})


def check_source(target_full_name: str, source: str, include_test: bool = False) -> Dict[str, List[str]]:
    """The source's cases, after checking they fit the target (channels); cheap, so run before long work."""
    target_json = load_json(os.path.join(paths.raw(), target_full_name, "dataset.json"))
    cases, source_json = source_images(target_full_name, source, include_test)
    _check_channels(source, target_full_name, cases, source_json, target_json)
    return cases


def preprocess_pretraining(target_full_name: str, source: str, plans_file: str, configuration: str,
                           pool: CasePool, part: Optional[int] = None, total_parts: Optional[int] = None,
                           rerun_hint: str = "", show_progress: bool = True, include_test: bool = False) -> str:
    """Preprocess the images of ``source`` (full dataset name or intask) with the target's plans; returns the folder.

    ``include_test``: also the target's own imagesTs (see the module docstring); warns."""
    plans_manager = PlansManager(plans_file)
    cm = plans_manager.get_configuration(configuration)
    target_json = load_json(os.path.join(paths.preprocessed(), target_full_name, "dataset.json"))
    cases, source_json = source_images(target_full_name, source, include_test)
    own_test = sorted(k for k in cases if k.startswith(TEST_CASE_PREFIX)) if is_own_images(target_full_name,
                                                                                          source) else []
    if own_test:
        print(f"nnssl: WARNING --intask_include_test: the {len(own_test)} imagesTs image(s) of {target_full_name} "
              f"are pretraining data ({TEST_CASE_PREFIX}<case>). A model pretrained on them has seen its test "
              f"images: test results on imagesTs are then not independent of pretraining. This is recorded in "
              f"{MANIFEST} (\"includes_test_images\": true) and in every checkpoint's case list.", file=sys.stderr)
    _check_channels(source, target_full_name, cases, source_json, target_json)
    folder = pretraining_data_folder(target_full_name, source, cm.data_identifier)
    signature = preprocessing_signature(plans_manager, cm)
    ensure_signature(folder, signature, rerun_hint)
    reader_plans = _reader_plans(plans_manager, source_json, next(iter(cases.values()))[0])
    writer = CaseWriter(reader_plans, cm, target_json, folder)
    jobs = [CaseJob(k, tuple(cases[k]), None) for k in select_part(cases, part, total_parts)]
    run_cases(writer, jobs, cases.keys(), pool, f"Preprocessing -pd {source} {configuration}",
              show_progress)
    write_json({
        "target": target_full_name,
        "source": source,
        "plans_name": plans_manager.plans_name,
        "configuration": configuration,
        "data_identifier": cm.data_identifier,
        "num_cases": len(finished_cases(folder) & set(cases)),
        "num_expected": len(cases),
        "signature": signature,
        "includes_test_images": bool(own_test),
        "cases": sorted(cases),
    }, os.path.join(folder, MANIFEST))
    return folder


def pretraining_cases(folder: str) -> List[str]:
    """The sorted identifiers of a pretraining data folder: its manifest's ``cases`` (manifests written
    before the list existed: every finished case in the folder)."""
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    if "cases" in manifest:
        return sorted(manifest["cases"])
    return sorted(finished_cases(folder))


def find_pretraining_data(target_full_name: str, source: str, data_identifier: str, architecture: str = "") -> str:
    """The folder of finished pretraining data for ``source`` under the target's current plans.

    Raises NnsslError (saying which command makes it) if it is missing, incomplete, or was made
    with plans that have changed since.
    """
    folder = pretraining_data_folder(target_full_name, source, data_identifier)
    arch = f" -a {architecture}" if architecture else ""
    command = f"nnssl_plan_and_preprocess -d {target_full_name}{arch} -pd {source}"
    manifest_file = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise NnsslError(f"No preprocessed pretraining data for {source} under {target_full_name}'s plans "
                         f"({data_identifier}; expected {folder}). Run `{command}` first.")
    with open(manifest_file, encoding="utf-8") as f:
        manifest = json.load(f)
    n_done = len(finished_cases(folder) & set(manifest["cases"])) if "cases" in manifest else len(
        finished_cases(folder))
    if n_done < manifest["num_expected"]:
        raise NnsslError(f"The pretraining data in {folder} is incomplete ({n_done} of {manifest['num_expected']} "
                         f"cases). Rerun `{command}` (all --part jobs, if you split it) to finish it.")
    current = _current_signature(target_full_name, data_identifier, architecture)
    if current is not None and current != manifest["signature"]:
        raise NnsslError(f"The pretraining data in {folder} was preprocessed with other plans than "
                         f"{target_full_name}'s current ones. Delete that folder and rerun `{command}`.")
    return folder


def _current_signature(target_full_name: str, data_identifier: str, architecture: str) -> Optional[dict]:
    """Signature of the first plans (of ``architecture``, or of any registered one) with that data identifier."""
    from nnssl.architectures import ARCHITECTURES

    specs = [ARCHITECTURES.get(architecture)] if architecture else [s for _, s in ARCHITECTURES.items()]
    for spec in specs:
        plans_file = os.path.join(paths.preprocessed(), target_full_name, spec.plans_name + ".json")
        if not os.path.isfile(plans_file):
            continue
        pm = PlansManager(plans_file)
        for c in pm.available_configurations:
            cm = pm.get_configuration(c)
            if cm.data_identifier == data_identifier:
                return preprocessing_signature(pm, cm)
    return None
