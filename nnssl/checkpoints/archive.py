"""The model archive (``.zip``) that shares a pretrained model (written by
``nnssl_export_pretrained`` / ``nnssl_import_pretrained``, :mod:`nnssl.checkpoints.publish`).

The archive holds four files:

- ``checkpoint_final.pth``: the pretraining checkpoint (without its resume state: optimizer and
  head states are only needed to continue that pretraining, not to fine-tune from it);
- ``checkpoint_final.json``: its metadata (the JSON copy ``nnssl_pretrain`` writes);
- ``plans.json``: the plans the model was pretrained under (spacing, normalization, network);
- ``model_card.json``: method, architecture, data, iterations, input channels, patch and
  spacing, software versions, license, citation, provenance; ``members``: the sha256 of each
  other file; ``sha256``: the checkpoint's (the id ``--like`` plans are named after);
  ``card_sha256``: the sha256 of the card itself without that field (canonical JSON).

Every command that takes a checkpoint (``nnssl_train -pretrained``, ``--like``,
``nnssl.load_pretrained``) also takes such an archive: every member is checked against the card
(an edited, added, removed or damaged member is refused with exit code 2) before the checkpoint
is loaded with ``torch.load(weights_only=True)``, so opening a model from someone else runs none
of its code.
"""
import hashlib
import io
import json
import os
import zipfile
from datetime import datetime, timezone

import torch

from nnssl.checkpoints.contract import METADATA_KEYS, OPTIONAL_METADATA_KEYS, to_plain
from nnssl.errors import NnsslError
from nnssl.io import atomic_path

CHECKPOINT_NAME = "checkpoint_final.pth"
METADATA_NAME = "checkpoint_final.json"
PLANS_NAME = "plans.json"
CARD_NAME = "model_card.json"
MEMBERS = (CHECKPOINT_NAME, METADATA_NAME, PLANS_NAME, CARD_NAME)
ARCHIVE_FORMAT = "nnssl model archive 2"  # 2: every member hashed, the card hashes itself


def is_archive(path: str) -> bool:
    return str(path).lower().endswith(".zip")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def card_digest(card: dict) -> str:
    """sha256 of the card's canonical JSON without its ``card_sha256`` field."""
    body = {k: v for k, v in card.items() if k != "card_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _refuse(path: str, what: str) -> NnsslError:
    return NnsslError(f"Model archive {path}: {what}; the archive was modified or damaged. Do not use it; get the "
                      f"original from its author (or export it again with nnssl_export_pretrained).")


def read_archive(path: str) -> dict:
    """Every member of the archive ``path``, verified against its model card: ``{name: bytes}``
    (NnsslError naming the member if one was edited, added, removed or damaged)."""
    if not os.path.isfile(path):
        raise NnsslError(f"Model archive {path} does not exist; pass a .zip written by nnssl_export_pretrained.")
    try:
        with zipfile.ZipFile(path) as z:
            members = {name: z.read(name) for name in z.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise NnsslError(f"Model archive {path} cannot be read ({type(e).__name__}: {e}); it is damaged. "
                         f"Copy it again.") from None
    if CARD_NAME not in members:
        raise NnsslError(f"Model archive {path} lacks {CARD_NAME}: it was not written by nnssl_export_pretrained "
                         f"(or was repacked). Export it again.")
    try:
        card = json.loads(members[CARD_NAME])
    except ValueError:
        raise _refuse(path, f"{CARD_NAME} is not valid JSON") from None
    if not isinstance(card, dict) or not isinstance(card.get("members"), dict):
        raise NnsslError(f"Model archive {path}: its {CARD_NAME} lists no sha256 per member (written by an older "
                         f"nnssl, or not a model card); export the checkpoint again with nnssl_export_pretrained.")
    if card.get("card_sha256") != card_digest(card):
        raise _refuse(path, f"{CARD_NAME} was edited (its content does not match its card_sha256)")
    listed = card["members"]
    for name in sorted(set(listed) | set(members) - {CARD_NAME}):
        if name not in members:
            raise _refuse(path, f"{name}, listed in {CARD_NAME}, is missing")
        if name not in listed:
            raise _refuse(path, f"{name} is not listed in {CARD_NAME}")
        digest = sha256_bytes(members[name])
        if digest != listed[name]:
            raise _refuse(path, f"the sha256 of {name} ({digest[:16]}...) does not match the model card's "
                                f"({str(listed[name])[:16]}...)")
    if CHECKPOINT_NAME not in members:
        raise NnsslError(f"Model archive {path} lacks {CHECKPOINT_NAME}: it was not written by "
                         f"nnssl_export_pretrained. Export it again.")
    return members


def read_archive_checkpoint(path: str) -> bytes:
    """The verified bytes of the checkpoint inside a model archive."""
    return read_archive(path)[CHECKPOINT_NAME]


def read_archive_card(path: str) -> dict:
    """The verified model card of a model archive."""
    return json.loads(read_archive(path)[CARD_NAME])


def write_archive(output: str, ckpt: dict, plans: str, card: dict) -> dict:
    """Write the archive ``output`` (atomically) for the contract dict ``ckpt`` (without resume state)
    and the plans JSON text ``plans``; ``card`` gets the format, the hashes and the export time.
    Returns the card as written."""
    if not is_archive(output):
        raise NnsslError(f"-o {output}: the model archive must end in .zip (e.g. -o model.zip).")
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    metadata_keys = METADATA_KEYS + tuple(k for k in OPTIONAL_METADATA_KEYS if k in ckpt)
    files = {CHECKPOINT_NAME: buffer.getvalue(),
             METADATA_NAME: json.dumps(to_plain({k: ckpt[k] for k in metadata_keys}), indent=2).encode("utf-8"),
             PLANS_NAME: plans.encode("utf-8")}
    card = {"format": ARCHIVE_FORMAT, **card, "sha256": sha256_bytes(files[CHECKPOINT_NAME]),
            "members": {name: sha256_bytes(data) for name, data in files.items()},
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    card["card_sha256"] = card_digest(card)
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # weights barely compress
            for name, data in files.items():
                z.writestr(name, data)
            z.writestr(CARD_NAME, json.dumps(card, indent=2))
    return card
