"""Load a checkpoint from a path, whatever file holds it, as a dict of the native contract
(:mod:`nnssl.checkpoints.contract`).

A path is read as

- a model archive (``.zip``, :mod:`nnssl.checkpoints.archive`): every member is checked against
  the model card's sha256 first;
- a torch file loaded with ``torch.load(weights_only=True)`` (so opening a model from someone else
  runs none of its code): a native checkpoint as it is, else the first foreign format
  (:mod:`nnssl.checkpoints.foreign`) that recognises its layout, converted to the contract.
"""
import hashlib
import io
import os
import pydoc
from typing import Dict, Optional

import torch

import nnssl.checkpoints.formats  # noqa: F401  (registers the foreign formats)
from nnssl.checkpoints.archive import is_archive, read_archive_checkpoint, sha256_bytes
from nnssl.checkpoints.contract import RESUME_KEYS, check_contract, to_plain
from nnssl.checkpoints.foreign import to_native
from nnssl.errors import NnsslError


def load_checkpoint_file(path: str, format: Optional[str] = None) -> dict:
    """The checkpoint dict in ``path`` (archive, native or foreign file), checked against the contract.

    ``format``: the name of a foreign format to read ``path`` as (default: recognised by layout).
    """
    if not os.path.isfile(path):
        raise NnsslError(f"Checkpoint {path} does not exist; pass the path of a pretraining checkpoint_final.pth, "
                         f"a model archive (.zip) or a pretrained file of a format nnssl reads.")
    try:
        source = io.BytesIO(read_archive_checkpoint(path)) if is_archive(path) else path
        with torch.serialization.safe_globals(_numpy_scalars()):
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except NnsslError:
        raise
    except Exception as e:  # truncated file, not a torch file, or unsafe pickled objects
        raise NnsslError(
            f"Checkpoint {path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). It is corrupted (e.g. an interrupted copy) or not a "
            f"pretrained model; copy it again or rerun nnssl_pretrain.") from None
    if format is not None or not (isinstance(obj, dict) and "nnssl_checkpoint_version" in obj):
        obj = to_native(obj, path, format)
    return check_contract(obj, path)


def _numpy_scalars() -> list:
    """What a numpy scalar in a foreign file (e.g. PyMIC's ``valid_pred``) unpickles from: data, no
    code. Everything else stays refused by ``weights_only``."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32",
                                                                            "bool"))]


def checkpoint_sha256(path: str) -> str:
    """sha256 of the checkpoint bytes (for an archive: of the checkpoint inside it, verified)."""
    if is_archive(path):
        return sha256_bytes(read_archive_checkpoint(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_torch_class(a, b) -> bool:
    """'torch.nn.LeakyReLU' and 'torch.nn.modules.activation.LeakyReLU' name one class (nnU-Net's
    planners and other writers spell them differently); only torch.nn names are resolved."""
    if not (isinstance(a, str) and isinstance(b, str) and a.startswith("torch.nn.") and b.startswith("torch.nn.")):
        return False
    found = pydoc.locate(a)
    return found is not None and found is pydoc.locate(b)


def _kwargs_differences(expected: dict, found: dict):
    exp, got = to_plain(expected), to_plain(found)
    diffs = []
    for k in sorted(set(exp) | set(got)):
        if k not in got:
            diffs.append(f"arch_kwargs['{k}'] missing in the checkpoint (expected {exp[k]!r})")
        elif k not in exp:
            diffs.append(f"arch_kwargs['{k}'] = {got[k]!r} in the checkpoint is not expected")
        elif exp[k] != got[k] and not _same_torch_class(exp[k], got[k]):
            diffs.append(f"arch_kwargs['{k}']: checkpoint {got[k]!r}, expected {exp[k]!r}")
    return diffs


def load_pretraining_checkpoint(path: str, expected_architecture_class: Optional[str] = None,
                                expected_arch_kwargs: Optional[Dict] = None,
                                expected_input_channels: Optional[int] = None) -> dict:
    """Load and validate a pretraining checkpoint; refuse (NnsslError) one that does not fit.

    Every difference from the expectations is listed in one message.
    """
    ckpt = load_checkpoint_file(path)
    arch = ckpt["architecture"]
    diffs = []
    if expected_architecture_class is not None and arch.get("network_class_name") != expected_architecture_class:
        diffs.append(f"architecture class: checkpoint {arch.get('network_class_name')}, "
                     f"expected {expected_architecture_class}")
    if expected_arch_kwargs is not None:
        diffs.extend(_kwargs_differences(expected_arch_kwargs, arch.get("arch_kwargs", {})))
    if expected_input_channels is not None and int(ckpt["input_channels"]) != int(expected_input_channels):
        diffs.append(f"input channels: checkpoint {ckpt['input_channels']}, expected {expected_input_channels}")
    if diffs:
        raise NnsslError(
            f"Checkpoint {path} does not fit the network it should initialize: " + "; ".join(diffs) + ". "
            f"Pretrain with the same architecture and plans as the fine-tuning (nnssl_pretrain -a ...), "
            f"or fine-tune with the plans the checkpoint was pretrained under.")
    return ckpt


def load_resume_checkpoint(path: str) -> dict:
    """A checkpoint for ``--c``: the contract plus a complete ``resume`` block, else NnsslError."""
    try:
        ckpt = load_checkpoint_file(path)
    except NnsslError as e:
        raise NnsslError(f"Cannot resume: {e} To start over instead, remove {os.path.dirname(path)}.") from None
    resume = ckpt.get("resume")
    missing = [k for k in RESUME_KEYS if not isinstance(resume, dict) or k not in resume]
    if missing:
        raise NnsslError(f"Cannot resume from {path}: its resume state is incomplete (missing "
                         f"{', '.join(missing)}), the file is corrupted. Remove it (and the folder "
                         f"{os.path.dirname(path)} to start over).")
    return ckpt


