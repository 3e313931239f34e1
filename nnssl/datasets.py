"""Dataset name resolution: ``1``, ``Dataset001_BTCV`` and ``BTCV`` all name the same dataset.

Names are looked up in the raw, preprocessed and results folders (like nnU-Net, so a dataset
whose raw data was deleted after preprocessing is still found). Ambiguous or unknown names
raise :class:`~nnssl.errors.NnsslError` listing what exists.
"""
import os
import re
from typing import List, Sequence

from nnssl import paths
from nnssl.errors import NnsslError

_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def known_datasets(where: Sequence[str] = ("raw", "preprocessed", "results")) -> List[str]:
    """All ``DatasetXXX_NAME`` folders in the given nnU-Net folders, sorted."""
    found = set()
    for w in where:
        root = getattr(paths, w)()
        if os.path.isdir(root):
            found.update(d for d in os.listdir(root) if _DATASET_RE.match(d) and os.path.isdir(os.path.join(root, d)))
    return sorted(found)


def dataset_id(full_name: str) -> int:
    m = _DATASET_RE.match(full_name)
    if not m:
        raise NnsslError(f"'{full_name}' is not a dataset folder name of the form DatasetXXX_NAME.")
    return int(m.group(1))


def resolve(name_or_id, where: Sequence[str] = ("raw", "preprocessed", "results")) -> str:
    """Return the full ``DatasetXXX_NAME`` for an ID, full name or short name."""
    existing = known_datasets(where)
    s = str(name_or_id).strip()
    if s.isdigit():
        matches = [d for d in existing if dataset_id(d) == int(s)]
    elif _DATASET_RE.match(s):
        matches = [d for d in existing if d == s]
    else:
        matches = [d for d in existing if _DATASET_RE.match(d).group(2) == s]
        if not matches:  # be forgiving about case, but only when it is unambiguous
            matches = [d for d in existing if _DATASET_RE.match(d).group(2).lower() == s.lower()]
    if len(matches) == 1:
        return matches[0]
    folders = ", ".join(getattr(paths, w)() for w in where)
    listing = ", ".join(existing) if existing else "none"
    if not matches:
        raise NnsslError(
            f"Dataset '{s}' not found in {folders}. Existing datasets: {listing}. "
            f"Give an ID (1), a full name (Dataset001_BTCV) or a short name (BTCV) of one of them, "
            f"or convert the dataset first (nnssl_convert_btcv / nnssl_convert_msd / nnssl_convert_unlabeled)."
        )
    raise NnsslError(
        f"Dataset name '{s}' is ambiguous: it matches {', '.join(matches)}. Use the full name or the ID."
    )


def free_id(preferred: int = None, start: int = 1) -> int:
    """The preferred ID if unused (raising if taken by another name is the caller's job), else the lowest free one."""
    used = {dataset_id(d) for d in known_datasets()}
    if preferred is not None:
        return preferred
    i = start
    while i in used:
        i += 1
    if i > 999:
        raise NnsslError("All dataset IDs 1-999 are in use; pass -d with an ID to reuse one.")
    return i


def full_name(ds_id: int, short_name: str) -> str:
    if not 0 < int(ds_id) < 1000:
        raise NnsslError(f"Dataset ID {ds_id} is out of range; nnU-Net dataset IDs are 1-999.")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", short_name):
        raise NnsslError(
            f"Dataset name '{short_name}' may only contain letters, digits, '-' and '_' (it becomes a folder name)."
        )
    return f"Dataset{int(ds_id):03d}_{short_name}"


def check_id_free(ds_id: int, short_name: str) -> str:
    """Full name for a new dataset; refuses an ID already used by a dataset of another name."""
    name = full_name(ds_id, short_name)
    clash = [d for d in known_datasets() if dataset_id(d) == int(ds_id) and d != name]
    if clash:
        raise NnsslError(
            f"Dataset ID {int(ds_id)} is already used by {clash[0]}. Pass another ID with -d "
            f"(free IDs start at {free_id()})."
        )
    return name
