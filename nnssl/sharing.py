"""Share a pretrained model: ``nnssl_export_pretrained CHECKPOINT -o model.zip``.

The archive holds four files:

- ``checkpoint_final.pth``: the pretraining checkpoint (without its resume state: optimizer and
  head states are only needed to continue that pretraining, not to fine-tune from it);
- ``checkpoint_final.json``: its metadata (the JSON copy ``nnssl_pretrain`` writes);
- ``plans.json``: the plans the model was pretrained under (spacing, normalization, network);
- ``model_card.json``: method, architecture, data names and volume count, iterations, input
  channels, patch and spacing, and the sha256 of ``checkpoint_final.pth``.

Every command that takes a checkpoint (``nnssl_train -pretrained``, ``--like``,
``nnssl.load_pretrained``) also takes such an archive: the checkpoint bytes are checked against
the card's sha256 (a tampered or damaged archive is refused) and loaded with
``torch.load(weights_only=True)``, so opening a model from someone else runs none of its code.
"""
import hashlib
import io
import json
import os
import zipfile
from datetime import datetime, timezone

import torch

from nnssl.errors import NnsslError
from nnssl.io import atomic_path

CHECKPOINT_NAME = "checkpoint_final.pth"
CARD_NAME = "model_card.json"
MEMBERS = (CHECKPOINT_NAME, "checkpoint_final.json", "plans.json", CARD_NAME)


def is_archive(path: str) -> bool:
    return str(path).lower().endswith(".zip")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_archive_checkpoint(path: str) -> bytes:
    """The verified bytes of the checkpoint inside a model archive (NnsslError if damaged or tampered)."""
    if not os.path.isfile(path):
        raise NnsslError(f"Model archive {path} does not exist; pass a .zip written by nnssl_export_pretrained.")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            missing = [m for m in (CHECKPOINT_NAME, CARD_NAME) if m not in names]
            if missing:
                raise NnsslError(f"Model archive {path} lacks {', '.join(missing)}: it was not written by "
                                 f"nnssl_export_pretrained (or was repacked). Export it again.")
            card = json.loads(z.read(CARD_NAME))
            data = z.read(CHECKPOINT_NAME)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise NnsslError(f"Model archive {path} cannot be read ({type(e).__name__}: {e}); it is damaged. "
                         f"Copy it again.") from None
    expected = card.get("sha256") if isinstance(card, dict) else None
    if expected != _sha256(data):
        raise NnsslError(f"Model archive {path}: the checkpoint's sha256 {_sha256(data)[:16]}... does not match the "
                         f"model card's {str(expected)[:16]}...; the archive was modified or damaged. Do not use "
                         f"it; get the original from its author.")
    return data


def load_checkpoint_file(path: str) -> dict:
    """``torch.load(weights_only=True)`` of a checkpoint file or of the checkpoint in a model archive."""
    if is_archive(path):
        return torch.load(io.BytesIO(read_archive_checkpoint(path)), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_sha256(path: str) -> str:
    """sha256 of the checkpoint bytes (for an archive: of the checkpoint inside it, verified)."""
    if is_archive(path):
        return _sha256(read_archive_checkpoint(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_pretrained(checkpoint: str, output: str) -> dict:
    """Write the model archive ``output`` (atomically) for ``checkpoint``; returns its model card."""
    from nnssl import paths
    from nnssl.checkpoints import METADATA_KEYS, load_pretraining_checkpoint, to_plain

    if is_archive(checkpoint):
        raise NnsslError(f"{checkpoint} is already a model archive; export the checkpoint_final.pth it came from.")
    if not is_archive(output):
        raise NnsslError(f"-o {output}: the model archive must end in .zip (e.g. -o model.zip).")
    ckpt = load_pretraining_checkpoint(checkpoint)
    plans_file = os.path.join(paths.preprocessed(), ckpt["dataset"], ckpt["plans_name"] + ".json")
    if not os.path.isfile(plans_file):
        raise NnsslError(f"The plans the checkpoint was pretrained under ({plans_file}) are missing; export on the "
                         f"machine that pretrained it, or point nnUNet_preprocessed at its preprocessed folder.")
    shared = {k: v for k, v in ckpt.items() if k != "resume"}
    buffer = io.BytesIO()
    torch.save(shared, buffer)
    data = buffer.getvalue()
    metadata = to_plain({k: ckpt[k] for k in METADATA_KEYS})
    card = {
        "format": "nnssl model archive 1",
        "method": ckpt["method"]["name"],
        "architecture": ckpt["architecture"]["name"],
        "network_class_name": ckpt["architecture"]["network_class_name"],
        "pretraining_dataset": ckpt["dataset"],
        "pretraining_data": ckpt["pretraining_data"],
        "num_volumes": _volume_count(ckpt),
        "iterations": int(ckpt["iteration"]),
        "input_channels": int(ckpt["input_channels"]),
        "patch_size": ckpt["normalization"]["patch_size"],
        "spacing": ckpt["normalization"]["spacing"],
        "normalization_schemes": ckpt["normalization"]["normalization_schemes"],
        "transfer": ckpt["transfer"],
        "sha256": _sha256(data),
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # weights barely compress
            z.writestr(CHECKPOINT_NAME, data)
            z.writestr("checkpoint_final.json", json.dumps(metadata, indent=2))
            with open(plans_file, encoding="utf-8") as f:
                z.writestr("plans.json", f.read())
            z.writestr(CARD_NAME, json.dumps(card, indent=2))
    return card


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
