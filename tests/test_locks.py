"""One writer per output folder (nnssl/locks.py): a live holder refuses, a dead one is reported stale."""
import json
import os
import socket
import subprocess
import sys

import pytest

from nnssl import locks
from nnssl.errors import NnsslError


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(folder, pid, host=None, name=locks.LOCK_NAME):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00",
                   "command": "nnssl_pretrain -d 1"}, f)
    return path


def test_second_writer_is_refused_and_lock_released(tmp_path):
    out = str(tmp_path / "out")
    with locks.exclusive(out, "The folder X") as path:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(NnsslError, match=rf"The folder X is being written by another run: process {os.getpid()} "
                                             rf"on host {socket.gethostname()}"):
            locks.acquire(out, "The folder X")
    assert not os.path.exists(out)  # made for the lock only: removed with it


def test_lock_released_on_error_and_folder_with_outputs_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with locks.exclusive(str(out), "X"):
            (out / "result.txt").write_text("done", encoding="utf-8")
            raise KeyboardInterrupt
    assert sorted(os.listdir(out)) == ["result.txt"]


def test_dead_holder_is_reported_stale_with_the_command_to_clear_it(tmp_path):
    pid = dead_pid()
    path = write_lock(str(tmp_path / "out"), pid)
    assert locks.lock_state(path) == "stale"
    with pytest.raises(NnsslError) as e:
        locks.acquire(str(tmp_path / "out"), "The folder X")
    msg = str(e.value)
    assert f"stale lock {path}: process {pid}" in msg and f"`rm {path}`" in msg
    assert os.path.exists(path)  # reported, not silently taken over


def test_other_host_and_unreadable_locks_are_held(tmp_path):
    path = write_lock(str(tmp_path / "a"), dead_pid(), host="some-other-node")
    assert locks.lock_state(path) == "held"  # its PID cannot be checked from here
    with pytest.raises(NnsslError, match="on host some-other-node .*clear the lock with `rm "):
        locks.acquire(str(tmp_path / "a"), "X")
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / locks.LOCK_NAME).write_text("", encoding="utf-8")
    with pytest.raises(NnsslError, match="cannot be read"):
        locks.acquire(str(tmp_path / "b"), "X")
