"""Prediction with nnU-Net's ``nnUNetPredictor`` into the folder ``nnUNetv2_predict`` writes.

The only nnU-Net step replaced is finding the trainer class named in the checkpoint:
``nnUNetPredictor.initialize_from_trained_model_folder`` crawls nnU-Net's trainer folder for
it (which breaks when an unrelated trainer's dependency does not import, see
``nnssl/training/trainer_lookup.py``); :class:`nnsslPredictor` looks it up with nnssl's lookup
and hands the built network to ``manual_initialization``. Sliding window, Gaussian weighting,
mirroring TTA, preprocessing and export are nnU-Net's.

Before anything is predicted the inputs are checked against the model's ``dataset.json``
(file naming, number of channels per case, same geometry for all channels of a case), so bad
input fails with a message naming the case instead of a crash in a worker process. The images
to predict are also read once to refuse truncated files (ITK zero-fills the missing part) and
NaN/Inf intensities (ITK's NIfTI reader turns them into 0): both would give a segmentation of
data that is not the scan, with exit code 0 (:func:`check_input_images`).

Outputs are written to ``OUT/.nnssl_partial/`` and moved into ``OUT`` when complete, so an
interrupted run never leaves a half-written segmentation; ``continue_prediction`` then predicts
only the cases whose segmentation is missing. ``OUT`` has one writer at a time (``OUT/.nnssl.lock``,
:mod:`nnssl.locks`): a second run into it is refused instead of deleting the first one's staging
folder.

``num_parts`` / ``part_id`` split the cases over several processes (GPUs, machines) as
``nnUNetv2_predict -num_parts/-part_id`` does: part ``i`` takes every ``num_parts``-th case of
the sorted case list starting at ``i``, before already predicted cases are dropped. Each part
stages into its own ``OUT/.nnssl_partial_part<i>/`` and holds its own lock, so the parts may
write into one ``OUT`` at once.
"""
import os
import re
import shutil
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnssl import locks
from nnssl.devices import resolve_device
from nnssl.errors import NnsslError
from nnssl.io import check_writable, write_json
from nnssl.training.finetune import fold_folder, resolve_run
from nnssl.training.trainer_lookup import find_trainer_class

STAGING = ".nnssl_partial"
_SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class nnsslPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that finds the trainer class with nnssl's trainer lookup."""

    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Union[Sequence[Union[int, str]], None],
                                             checkpoint_name: str = "checkpoint_final.pth"):
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        dataset_json = load_json(os.path.join(model_training_output_dir, "dataset.json"))
        plans_manager = PlansManager(load_json(os.path.join(model_training_output_dir, "plans.json")))
        checkpoints = [torch.load(os.path.join(model_training_output_dir, f"fold_{f}", checkpoint_name),
                                  map_location="cpu", weights_only=False) for f in use_folds]
        first = checkpoints[0]
        configuration_manager = plans_manager.get_configuration(first["init_args"]["configuration"])
        trainer_class = find_trainer_class(first["trainer_name"])
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            enable_deep_supervision=False)
        parameters = [c["network_weights"] for c in checkpoints]
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   first["trainer_name"], first.get("inference_allowed_mirroring_axes"))


def _read_geometry(path: str) -> dict:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
            "direction": reader.GetDirection()}


def collect_cases(input_folder: str, dataset_json: dict) -> "OrderedDict[str, List[str]]":
    """{case id: [channel files in channel order]}; refuses misnamed files, wrong channel counts and
    channels of one case with different geometry."""
    if not os.path.isdir(input_folder):
        raise NnsslError(f"Input folder (-i) {input_folder} does not exist.")
    ending = dataset_json["file_ending"]
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    n_ch = len(channels)
    names = sorted(f for f in os.listdir(input_folder) if f.endswith(ending) and not f.startswith("."))
    if not names:
        raise NnsslError(f"Input folder (-i) {input_folder} has no *{ending} images (the model's file ending).")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    bad = [n for n in names if not pattern.match(n)]
    if bad:
        raise NnsslError(f"Input files {', '.join(bad[:5])} in {input_folder} are not named CASE_XXXX{ending} "
                         f"(XXXX = 4-digit channel index, 0000 for the first channel); rename them.")
    cases: Dict[str, Dict[int, str]] = OrderedDict()
    for n in names:
        case, ch = pattern.match(n).groups()
        cases.setdefault(case, {})[int(ch)] = os.path.join(input_folder, n)
    expected = list(range(n_ch))
    described = ", ".join(f"_{int(k):04d} {v}" for k, v in channels.items())
    for case, files in cases.items():
        if sorted(files) != expected:
            raise NnsslError(
                f"Case '{case}' in {input_folder} has channel files {[f'_{c:04d}' for c in sorted(files)]}, but the "
                f"model was trained on {n_ch} channel(s) ({described}). Provide exactly these channels per case.")
        if n_ch > 1 and ending.lower().endswith(_SITK_ENDINGS):
            ref = _read_geometry(files[0])
            for c in expected[1:]:
                g = _read_geometry(files[c])
                diff = [k for k in ("size", "spacing", "origin", "direction")
                        if len(g[k]) != len(ref[k]) or not np.allclose(g[k], ref[k], atol=1e-4, rtol=1e-4)]
                if diff:
                    raise NnsslError(
                        f"Case '{case}': channel _{c:04d} ({os.path.basename(files[c])}) differs from channel _0000 in "
                        f"{', '.join(diff)} ({', '.join(f'{k} {g[k]} vs {ref[k]}' for k in diff)}). All channels "
                        f"of a case must share one voxel grid; resample them onto channel _0000 first.")
    return OrderedDict((case, [files[c] for c in expected]) for case, files in cases.items())


def check_input_images(cases: Dict[str, List[str]], names: Sequence[str]) -> None:
    """Refuse truncated files and NaN/Inf intensities among the channel files of the cases ``names``.

    NaN/Inf are refused, not replaced: training data with them is refused too (raw-data checks),
    and any replacement value (0, the minimum, ...) is a guess that changes the segmentation
    near those voxels without the user seeing it; the message gives the one-line fix instead.
    """
    from nnssl.dataset_conversion.validation import check_finite_image, read_image

    for case in names:
        for f in cases[case]:
            if not f.lower().endswith(_SITK_ENDINGS):
                continue
            try:
                check_finite_image(read_image(f), f)
            except NnsslError as e:
                raise NnsslError(f"Input case '{case}' (-i) is not predicted: {e}") from None


def _model_folder(ds: str, trainer: str, plans: str, configuration: str, folds: List, checkpoint: str,
                  arch_name: str) -> str:
    folder = fold_folder(ds, trainer, plans, configuration)
    for f in folds:
        ckpt = os.path.join(folder, f"fold_{f}", checkpoint)
        if not os.path.isfile(ckpt):
            hint = (f"Train it: nnssl_train {ds} {configuration} {f} -a {arch_name} -tr {trainer} -p {plans}"
                    if checkpoint == "checkpoint_final.pth" else
                    f"Pick a checkpoint that exists with -chk (training writes checkpoint_final.pth at its end).")
            raise NnsslError(f"Fold {f} has no {checkpoint} ({ckpt} is missing). {hint}")
    for name in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise NnsslError(f"{os.path.join(folder, name)} is missing: the training folder is incomplete. Rerun the "
                             f"training (nnssl_train ... --c).")
    return folder


def predict(input_folder: str, output_folder: str, dataset, configuration: str = "3d_fullres",
            folds: Sequence[Union[int, str]] = (0,), architecture: Optional[str] = None, trainer: Optional[str] = None,
            plans: Optional[str] = None, checkpoint: str = "checkpoint_final.pth", device: Optional[str] = None,
            disable_tta: bool = False, step_size: float = 0.5, npp: int = 3, nps: int = 3,
            save_probabilities: bool = False, continue_prediction: bool = False, num_parts: int = 1,
            part_id: int = 0) -> dict:
    """Segment every case of ``input_folder`` (this part's share of it) into ``output_folder``
    (nnUNetv2_predict's layout)."""
    if not 0 < step_size <= 1:
        raise NnsslError(f"-step_size must be in (0, 1] (got {step_size}).")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise NnsslError(f"-part_id must be in 0..{num_parts - 1} and -num_parts at least 1 (got -num_parts "
                         f"{num_parts} -part_id {part_id}); for 3 parts run -part_id 0, 1 and 2.")
    check_writable(output_folder, "The output folder (-o)")
    folds = [f if str(f) == "all" else int(f) for f in folds]
    dev = resolve_device(device)
    ds, plans_name, trainer_name, spec = resolve_run(dataset, configuration, architecture, plans, trainer,
                                                     where=("raw", "preprocessed", "results"))
    model_dir = _model_folder(ds, trainer_name, plans_name, configuration, folds, checkpoint, spec.name)
    dataset_json = load_json(os.path.join(model_dir, "dataset.json"))
    cases = collect_cases(input_folder, dataset_json)
    if os.path.abspath(output_folder) == os.path.abspath(input_folder):
        raise NnsslError("The output folder (-o) is the input folder (-i); choose another -o (inputs are never "
                         "modified).")
    ending = dataset_json["file_ending"]
    mine = sorted(cases)[part_id::num_parts]  # nnUNetv2_predict's split, made before finished cases are dropped
    todo = [c for c in mine if not (continue_prediction and os.path.isfile(os.path.join(output_folder, c + ending))
                                      and (not save_probabilities or
                                           os.path.isfile(os.path.join(output_folder, c + ".npz"))))]
    check_input_images(cases, todo)
    # one writer per part: parts of one -num_parts split may share -o (their cases and staging folders differ)
    lock = locks.LOCK_NAME if num_parts == 1 else f"{locks.LOCK_NAME}_part{part_id}"
    with locks.exclusive(output_folder, f"The prediction folder (-o) {output_folder}", lock):
        _predict_into(output_folder, input_folder, model_dir, configuration, folds, checkpoint,
                      [cases[c] for c in todo], dev, disable_tta, step_size, npp, nps, save_probabilities,
                      continue_prediction, num_parts, part_id)
    return {"output_folder": output_folder, "model_folder": model_dir, "predicted": todo,
            "skipped": [c for c in mine if c not in todo]}


def _predict_into(output_folder: str, input_folder: str, model_dir: str, configuration: str, folds: List,
                  checkpoint: str, lists: List[List[str]], dev: torch.device, disable_tta: bool, step_size: float,
                  npp: int, nps: int, save_probabilities: bool, continue_prediction: bool, num_parts: int = 1,
                  part_id: int = 0) -> None:
    """Predict the channel-file ``lists`` into ``output_folder`` (whose lock this run holds) via the staging folder."""
    predictor = nnsslPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=not disable_tta,
                               perform_everything_on_device=dev.type == "cuda", device=dev, allow_tqdm=True)
    predictor.initialize_from_trained_model_folder(model_dir, folds, checkpoint)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise NnsslError(f"Configuration '{configuration}' is a cascade stage that needs the previous stage's "
                         f"predictions; use nnUNetv2_predict with -prev_stage_predictions for it.")

    stage = os.path.join(output_folder, STAGING if num_parts == 1 else f"{STAGING}_part{part_id}")
    shutil.rmtree(stage, ignore_errors=True)  # leftovers of an interrupted run
    os.makedirs(stage)
    if npp == 0 and nps == 0:
        predictor.predict_from_files_sequential(lists, stage, save_probabilities=save_probabilities)
    else:
        predictor.predict_from_files(lists, stage, save_probabilities=save_probabilities,
                                     num_processes_preprocessing=max(1, npp),
                                     num_processes_segmentation_export=max(1, nps))
    # Record the call as nnUNetv2_predict would for this command, then publish the finished files.
    args_file = os.path.join(stage, "predict_from_raw_data_args.json")
    args = load_json(args_file)
    args["list_of_lists_or_source_folder"] = os.path.abspath(input_folder)
    args["output_folder_or_list_of_truncated_output_files"] = os.path.abspath(output_folder)
    args["overwrite"] = not continue_prediction
    args.update(num_parts=num_parts, part_id=part_id)
    write_json(args, os.path.join(output_folder, "predict_from_raw_data_args.json"))
    os.remove(args_file)
    for name in sorted(os.listdir(stage)):
        os.replace(os.path.join(stage, name), os.path.join(output_folder, name))
    os.rmdir(stage)
