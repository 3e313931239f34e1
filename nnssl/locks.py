"""One writer per output folder: an exclusive lock file holding the writer's PID and host.

Used by ``nnssl_pretrain`` (the run folder), ``nnssl_predict`` (``-o``) and
``nnssl_plan_and_preprocess`` (``nnUNet_preprocessed/<Dataset>``). The lock file is created with
``O_CREAT | O_EXCL`` (atomic, also on NFS v3+), so of two runs started together exactly one
gets it; the other is refused with exit code 2 before it writes anything, naming the holder.

A lock outlives its writer only when the writer is killed without cleanup (``kill -9``, a
machine crash, SIGTERM of a batch system); Ctrl-C and errors release it. A lock whose PID is
no longer running on this host is reported as stale, with the command that clears it; it is
not cleared automatically, since the folder may hold half of what the dead run was writing
(rerunning the same command with ``--c`` / ``--continue_prediction`` or again resumes).
"""
import contextlib
import json
import os
import shlex
import socket
import sys
import time
from typing import Iterator, List, Optional

from nnssl.errors import NnsslError

LOCK_NAME = ".nnssl.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None  # being written this instant, or cut off by a crash


def lock_state(path: str) -> str:
    """``"held"`` (a live process on this host, or a process on another host), ``"stale"`` (its PID
    is not running on this host) or ``"unknown"`` (unreadable lock file)."""
    info = _holder(path)
    if info is None or not isinstance(info.get("pid"), int):
        return "unknown"
    if info.get("host") != socket.gethostname():
        return "held"
    return "held" if _pid_alive(info["pid"]) else "stale"


def _refusal(path: str, what: str) -> NnsslError:
    info = _holder(path) or {}
    state = lock_state(path)
    clear = f"rm {shlex.quote(path)}"
    who = (f"process {info.get('pid')} on host {info.get('host')} (started {info.get('started', '?')}: "
           f"{info.get('command', '?')})")
    if state == "stale":
        return NnsslError(
            f"{what} has a stale lock {path}: {who} is no longer running (killed, or its machine crashed), so "
            f"nobody writes there now. Clear it with `{clear}` and rerun (a resumable command continues where "
            f"the dead run stopped).")
    if state == "unknown":
        return NnsslError(
            f"{what} is locked by {path}, whose content cannot be read (a run that is just starting, or one that "
            f"crashed while writing it). If no other nnssl command is writing there, clear it with `{clear}` and "
            f"rerun.")
    return NnsslError(
        f"{what} is being written by another run: {who} holds {path}. Two writers would overwrite each other's "
        f"files. Wait for it to finish, or choose another output; if that process is gone (its host crashed, or "
        f"its PID was reused), clear the lock with `{clear}`.")


def acquire(folder: str, what: str, name: str = LOCK_NAME) -> str:
    """Create ``folder/name`` exclusively (creating ``folder`` if needed); returns its path.

    Raises NnsslError naming the holder (or that the lock is stale) when it exists, or when the
    folder cannot be written."""
    path = os.path.join(folder, name)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise _refusal(path, what) from None
    except OSError as e:
        raise NnsslError(f"Cannot create the lock file {path} for {what} ({e.strerror}). Check that the folder "
                         f"is writable, or choose another output.") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join([os.path.basename(sys.argv[0])]
                                                                                 + sys.argv[1:])}
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info, f)
    return path


def release(path: str) -> None:
    """Remove a lock this process holds (a lock of another holder is left alone)."""
    info = _holder(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        os.remove(path)


def refuse_if_locked(lock_paths: List[str], what: str) -> None:
    """Raise for the first existing lock of ``lock_paths`` (writers of an overlapping output)."""
    for path in lock_paths:
        if os.path.exists(path):
            raise _refusal(path, what)


@contextlib.contextmanager
def exclusive(folder: str, what: str, name: str = LOCK_NAME) -> Iterator[str]:
    """``with exclusive(folder, "The prediction folder X"):`` -- the only writer of ``folder``.

    A folder created only to hold the lock is removed again when nothing else was written
    into it (a refused command leaves no empty output folder behind)."""
    created = not os.path.isdir(folder)
    path = acquire(folder, what, name)
    try:
        yield path
    finally:
        release(path)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty
