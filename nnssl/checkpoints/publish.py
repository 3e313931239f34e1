"""Share pretrained models: ``nnssl_export_pretrained CHECKPOINT -o model.zip`` packs a pretraining
checkpoint into a model archive (:mod:`nnssl.checkpoints.archive`); ``nnssl_import_pretrained FILE
-o model.zip`` does the same for a foreign pretrained file (:mod:`nnssl.checkpoints.foreign`), with
a card saying where it came from.

The model card records what made the model: the software versions (nnssl, nnunetv2, torch), a
license (``--license``; "unspecified" unless the exporter states one: the weights' terms depend on
the pretraining data, which nnssl cannot know) and the citation of the method's paper.
"""
import json
import os
from importlib import metadata
from typing import Optional

import torch

from nnssl.checkpoints.archive import is_archive, write_archive
from nnssl.checkpoints.contract import to_plain
from nnssl.checkpoints.loading import load_pretraining_checkpoint
from nnssl.citations import method_citation
from nnssl.errors import NnsslError
from nnssl.io import atomic_path


UNSPECIFIED_LICENSE = "unspecified"


def software_versions() -> dict:
    """{"nnssl", "nnunetv2", "torch"}: the installed versions that wrote a model card."""
    import nnssl

    return {"nnssl": nnssl.__version__, "nnunetv2": metadata.version("nnunetv2"), "torch": torch.__version__}


def model_card(ckpt: dict, license: str, num_volumes: Optional[int] = None) -> dict:
    """The model card fields a contract dict gives (the archive adds format, hashes, time)."""
    return {
        "method": ckpt["method"]["name"],
        "architecture": ckpt["architecture"]["name"],
        "network_class_name": ckpt["architecture"]["network_class_name"],
        "pretraining_dataset": ckpt["dataset"],
        "pretraining_data": ckpt["pretraining_data"],
        "num_volumes": num_volumes,
        "iterations": int(ckpt["iteration"]),
        "input_channels": int(ckpt["input_channels"]),
        "patch_size": ckpt["normalization"]["patch_size"],
        "spacing": ckpt["normalization"]["spacing"],
        "normalization_schemes": ckpt["normalization"]["normalization_schemes"],
        "transfer": ckpt["transfer"],
        "software": software_versions(),
        "license": license,
        "citation": method_citation(ckpt["method"]["name"]),
    }


def with_nnunet_plan(ckpt: dict, plans: dict) -> dict:
    """``ckpt`` plus the ``nnssl_adaptation_plan`` nnU-Net master reads, where its trainer can build the
    architecture (plainconvunet, resenc, resenc_l); else ``ckpt`` unchanged."""
    from nnssl.checkpoints.formats import openmind

    if ckpt["architecture"]["name"] not in openmind.WRITABLE:
        return ckpt
    return openmind.from_native(ckpt, plans)


def export_pretrained(checkpoint: str, output: str, license: str = UNSPECIFIED_LICENSE,
                      format: Optional[str] = None) -> dict:
    """Write the model archive ``output`` (atomically) for ``checkpoint``; returns its model card.

    The checkpoint inside carries an ``nnssl_adaptation_plan`` for the architectures nnU-Net master's
    ``PretrainedTrainer`` builds. ``format="nnunet"``: write that checkpoint alone to ``output``
    (``.pth``, what ``nnUNetv2_preprocess_like_nnssl -pc`` takes; nnssl reads it too); returns
    its adaptation plan.
    """
    from nnssl import paths

    if format not in (None, "nnunet"):
        raise NnsslError(f"--format {format}: nnssl_export_pretrained writes 'nnunet' (a .pth for nnU-Net's "
                         f"like_nnssl) or, without --format, a model archive (.zip).")
    if is_archive(checkpoint):
        raise NnsslError(f"{checkpoint} is already a model archive; export the checkpoint_final.pth it came from.")
    if format == "nnunet" and not str(output).endswith(".pth"):
        raise NnsslError(f"-o {output}: --format nnunet writes one checkpoint file; name it .pth (e.g. -o model.pth).")
    if format is None and not is_archive(output):
        raise NnsslError(f"-o {output}: the model archive must end in .zip (e.g. -o model.zip).")
    ckpt = load_pretraining_checkpoint(checkpoint)
    plans_file = os.path.join(paths.preprocessed(), ckpt["dataset"], ckpt["plans_name"] + ".json")
    if not os.path.isfile(plans_file):
        raise NnsslError(f"The plans the checkpoint was pretrained under ({plans_file}) are missing; export on the "
                         f"machine that pretrained it, or point nnUNet_preprocessed at its preprocessed folder.")
    with open(plans_file, encoding="utf-8") as f:
        plans = f.read()
    base = {k: v for k, v in ckpt.items() if k != "resume"}
    if format == "nnunet":
        from nnssl.checkpoints.formats import openmind

        shared = openmind.from_native(base, json.loads(plans))  # refuses what nnU-Net's trainer cannot build
        with atomic_path(output) as tmp:
            torch.save(shared, tmp)
        result = {"format": "nnunet", "nnssl_adaptation_plan": shared["nnssl_adaptation_plan"]}
        schemes = ckpt["normalization"]["normalization_schemes"]
        if any(s != "ZScoreNormalization" for s in schemes):
            result["warning"] = (f"nnU-Net master's nnUNetv2_preprocess_like_nnssl normalizes every channel with "
                                 f"ZScoreNormalization; this model was pretrained with {schemes}, so fine-tuning "
                                 f"there sees other intensities (nnssl's --like keeps the pretraining's).")
        return result
    return write_archive(output, with_nnunet_plan(base, json.loads(plans)), plans,
                         model_card(ckpt, license, _volume_count(ckpt)))


def import_pretrained(path: str, output: str, format: Optional[str] = None,
                      license: str = UNSPECIFIED_LICENSE) -> dict:
    """Write the model archive ``output`` for the foreign pretrained file ``path`` (its layout
    recognised, or read as ``format``); returns the model card, whose ``source`` names the file,
    its sha256 and format. ``plans.json`` holds the plans facts the format states."""
    from nnssl.checkpoints.foreign import FORMATS
    from nnssl.checkpoints.loading import checkpoint_sha256, load_checkpoint_file

    if not is_archive(output):
        raise NnsslError(f"-o {output}: the model archive must end in .zip (e.g. -o model.zip).")
    ckpt = load_checkpoint_file(path, format)
    name = ckpt["method"]["name"]
    if is_archive(path) or name not in FORMATS:
        raise NnsslError(f"{path} is already an nnssl checkpoint or model archive; nnssl_import_pretrained reads "
                         f"foreign files ({', '.join(sorted(FORMATS))}). Use nnssl_export_pretrained for nnssl's own.")
    plans = json.dumps(to_plain({"nnssl_imported_from": name, "plans_name": ckpt["plans_name"],
                                 "configurations": {ckpt["configuration"]: {
                                     "data_identifier": ckpt["data_identifier"], "architecture": ckpt["architecture"],
                                     **ckpt["normalization"]}}}), indent=2)
    card = {**model_card(ckpt, license),
            "source": {"format": name, "description": FORMATS[name].description, "file": os.path.basename(path),
                       "sha256": checkpoint_sha256(path)}}
    return write_archive(output, with_nnunet_plan(ckpt, None), plans, card)


def _volume_count(ckpt: dict):
    """Number of preprocessed volumes the model was pretrained on (recorded in the checkpoint; for older
    checkpoints from the data manifest), if known."""
    from nnssl.planning.pretraining_data import MANIFEST, pretraining_data_folder

    if "pretraining_cases_count" in ckpt:
        return int(ckpt["pretraining_cases_count"])

    folder = pretraining_data_folder(ckpt["dataset"], ckpt["pretraining_data"], ckpt["data_identifier"])
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return int(json.load(f)["num_cases"])
    except (OSError, ValueError, KeyError):
        return None
