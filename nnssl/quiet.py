"""Quiet console by default: nnU-Net's bulky printouts go to a log file, the rest stays on screen.

nnU-Net prints whole plans dictionaries, configuration dumps and module lists with ``print``.
Inside :func:`details_to_log` every line printed to ``sys.stdout`` is appended to a log file, and
only lines that are not such details reach the console; ``verbose=True`` shows everything (and
still writes the log). Progress bars (tqdm, on stderr) are untouched. Output written by other
processes straight to file descriptor 1 is not affected.

A line is a detail when it is one of nnU-Net's dumps or chatter lines (:data:`DETAIL_PATTERNS`),
a line longer than :data:`MAX_CONSOLE_LINE` characters holding a dictionary, or part of a
multi-line module listing (``Name(`` ... ``)``, as ``print(network)`` writes). Training progress
(losses, pseudo Dice, learning rate, epoch times) stays on the console.
"""
import contextlib
import os
import re
import sys
import time
from typing import Iterator, Optional, TextIO

MAX_CONSOLE_LINE = 240
# nnU-Net's lines that introduce or are details (after its "YYYY-mm-dd HH:MM:SS.ffffff: " log prefix)
DETAIL_PATTERNS = re.compile(
    r"^(\S+ \S+: )?\s*("
    r"[{\[]|"  # a dictionary or list dump
    r"Using <class .*> as reader/writer|"
    r".*U-Net configuration:|"
    r"Dropping 3d_lowres config|"
    r"Plans were saved to|"
    r"This is the configuration used by this training:|"
    r"These are the global plan.json settings:|"
    r"Configuration name:|"
    r"do_dummy_2d_data_aug:|"
    r"Unable to plot network architecture:|"
    r"No module named 'hiddenlayer'|"
    r"perform_everything_on_device|"  # nnU-Net's predictor chatter
    r"There are \d+ cases|"
    r"I am process \d+ out of|"
    r"\(\w+\): )")
_MODULE_START = re.compile(r"^\s*(\(\w+\): )?[A-Z]\w*\($")


class _DetailFilter:
    """A text stream: every line to ``log``; lines that are not details also to ``console``."""

    def __init__(self, console: TextIO, log: TextIO, verbose: bool):
        self.console, self.log, self.verbose = console, log, verbose
        self._partial = ""
        self._depth = 0  # open parentheses of a module listing in progress
        self._last_detail = False  # blank lines after a hidden dump are hidden with it

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        self.log.write(line + "\n")
        if self._depth or _MODULE_START.match(line):
            self._depth = max(0, self._depth + line.count("(") - line.count(")"))
            detail = True
        else:
            detail = bool(DETAIL_PATTERNS.match(line)) or (len(line) > MAX_CONSOLE_LINE and "{" in line) or \
                (self._last_detail and not line.strip())
        self._last_detail = detail
        if self.verbose or not detail:
            self.console.write(line + "\n")

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def close_partial(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""


@contextlib.contextmanager
def details_to_log(log_path: Optional[str], verbose: bool = False, title: str = "") -> Iterator[str]:
    """Within the block, nnU-Net's detail lines on stdout go to ``log_path`` only (appended), unless
    ``verbose``. Yields the log path. ``log_path=None`` changes nothing."""
    if log_path is None:
        yield log_path
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n")
        stream = _DetailFilter(sys.stdout, log, verbose)
        try:
            with contextlib.redirect_stdout(stream):
                yield log_path
        finally:
            stream.close_partial()
            stream.flush()
