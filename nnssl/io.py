"""Atomic file writing: outputs appear under their final name only when complete.

An interrupted command therefore never leaves a half-written file that a later run would
mistake for a finished one; rerunning the command redoes exactly the missing outputs.
"""
import contextlib
import json
import os
import uuid
from typing import Iterator

from nnssl.errors import NnsslError


def check_writable(path: str, what: str) -> None:
    """Refuse (NnsslError, exit 2) an output folder ``path`` that cannot be created or written.

    Checked up front by every command that writes (predict, evaluate, compare, export, pretrain,
    plan, train), so a read-only or misspelt location fails at once with the fix instead of with a
    traceback after the work. The folder itself need not exist yet: its nearest existing ancestor
    must be a writable folder."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NnsslError(f"{what} {path} cannot be created: {existing} is a file, not a folder. Choose another "
                         f"location, or move the file away.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NnsslError(f"{what} {path} is not writable: {existing} is read-only for this user (permissions, or a "
                         f"read-only file system). Choose a writable location, or make it writable (e.g. "
                         f"chmod u+w {existing}).")


def temp_name(final_path: str) -> str:
    """A hidden temporary name in the same folder that keeps the file's extension(s)
    (readers such as SimpleITK choose the format from it)."""
    folder, base = os.path.split(final_path)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{stem}{dot}{ext}")


@contextlib.contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
    """``with atomic_path(p) as tmp: write(tmp)`` -- renamed to ``p`` only if the block succeeds."""
    os.makedirs(os.path.dirname(os.path.abspath(final_path)), exist_ok=True)
    tmp = temp_name(final_path)
    try:
        yield tmp
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, final_path: str) -> None:
    with atomic_path(final_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
