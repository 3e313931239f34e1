"""Where a converted dataset goes, and how: built under a hidden name, published with one rename.

All converters follow the same sequence: validate every input (nothing is written yet), write
the dataset into ``$nnUNet_raw/.partial-DatasetXXX_NAME`` (each file atomically), then rename
that folder to ``DatasetXXX_NAME``. A ``DatasetXXX_NAME`` folder therefore always holds a
complete conversion. The staging folder is not a dataset name (it starts with a dot), so an
interrupted run leaves nothing nnssl or nnU-Net would pick up; rerunning the same conversion
keeps the files already finished there (resume), while changed inputs (another list of files,
or a file replaced in place: size/mtime) start afresh.
"""
import json
import os
import shutil
import uuid
from typing import Optional, Tuple

from nnssl import datasets, paths
from nnssl.errors import NnsslError
from nnssl.io import write_json

_PLAN_FILE = ".nnssl_plan.json"


def choose_target(dataset_id: Optional[int], name: str, overwrite: bool) -> Tuple[str, str]:
    """(``DatasetXXX_NAME``, its folder in nnUNet_raw) for a new conversion.

    Without ``dataset_id``: the ID of an existing dataset with this short name, else the lowest
    free ID. Refuses an ID used by another name, and an existing folder unless ``overwrite``.
    """
    if dataset_id is None:
        same = [d for d in datasets.known_datasets() if d.split("_", 1)[1] == name]
        dataset_id = datasets.dataset_id(same[0]) if same else datasets.free_id()
    full = datasets.check_id_free(int(dataset_id), name)
    final = os.path.join(paths.raw(), full)
    if os.path.exists(final) and not overwrite:
        raise NnsslError(
            f"'{final}' already exists. Delete it (or pass --overwrite) to convert again, or choose another "
            f"dataset ID with -d."
        )
    return full, final


def fingerprint(files: list) -> list:
    """[[size, mtime_ns], ...] of input files, so a plan notices an input replaced in place."""
    return [[os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]


def open_stage(final: str, plan) -> str:
    """The staging folder for dataset folder ``final``; kept from an interrupted run only if it had
    the same ``plan`` (any JSON-able description of inputs -> outputs), otherwise emptied."""
    stage = os.path.join(os.path.dirname(final), f".partial-{os.path.basename(final)}")
    plan = json.loads(json.dumps(plan))  # normalise tuples to lists for the comparison
    plan_path = os.path.join(stage, _PLAN_FILE)
    previous = None
    if os.path.isfile(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            previous = json.load(f)
    if previous != plan:
        shutil.rmtree(stage, ignore_errors=True)
        os.makedirs(stage)
        write_json(plan, plan_path)
    return stage


def publish(stage: str, final: str) -> None:
    """Rename the finished ``stage`` folder to ``final`` (replacing an existing one last)."""
    plan_path = os.path.join(stage, _PLAN_FILE)
    if os.path.exists(plan_path):
        os.remove(plan_path)
    if os.path.exists(final):
        trash = os.path.join(os.path.dirname(final), f".old-{uuid.uuid4().hex[:8]}-{os.path.basename(final)}")
        os.replace(final, trash)
        os.replace(stage, final)
        shutil.rmtree(trash)
    else:
        os.replace(stage, final)
