"""The model archive (``.zip``) that shares a pretrained model (written by
``nnssl_export_pretrained`` / ``nnssl_import_pretrained``, :mod:`nnssl.checkpoints.publish`).

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

from nnssl.checkpoints.contract import METADATA_KEYS, to_plain
from nnssl.errors import NnsslError
from nnssl.io import atomic_path

CHECKPOINT_NAME = "checkpoint_final.pth"
CARD_NAME = "model_card.json"
MEMBERS = (CHECKPOINT_NAME, "checkpoint_final.json", "plans.json", CARD_NAME)


def is_archive(path: str) -> bool:
    return str(path).lower().endswith(".zip")


def sha256_bytes(data: bytes) -> str:
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
    if expected != sha256_bytes(data):
        raise NnsslError(f"Model archive {path}: the checkpoint's sha256 {sha256_bytes(data)[:16]}... does not match the "
                         f"model card's {str(expected)[:16]}...; the archive was modified or damaged. Do not use "
                         f"it; get the original from its author.")
    return data


def write_archive(output: str, ckpt: dict, plans: str, card: dict) -> dict:
    """Write the archive ``output`` (atomically) for the contract dict ``ckpt`` (without resume state)
    and the plans JSON text ``plans``; ``card`` gets the checkpoint's sha256. Returns the card."""
    if not is_archive(output):
        raise NnsslError(f"-o {output}: the model archive must end in .zip (e.g. -o model.zip).")
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    data = buffer.getvalue()
    card = {**card, "sha256": sha256_bytes(data),
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    metadata = to_plain({k: ckpt[k] for k in METADATA_KEYS})
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # weights barely compress
            z.writestr(CHECKPOINT_NAME, data)
            z.writestr("checkpoint_final.json", json.dumps(metadata, indent=2))
            z.writestr("plans.json", plans)
            z.writestr(CARD_NAME, json.dumps(card, indent=2))
    return card
