"""Shared plumbing for the command-line entry points."""
import argparse
import sys
from typing import Callable, List, Optional

from nnssl.errors import NnsslError


def run_command(parser: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], object],
                argv: Optional[List[str]] = None) -> int:
    """Parse ``argv``, call ``fn(args)``; turn :class:`NnsslError` into a message and exit code 2.

    Exit codes: 0 success, 2 bad input (argparse uses 2 as well), 130 interrupted.
    """
    args = parser.parse_args(argv)
    try:
        fn(args)
    except NnsslError as e:
        print(f"\nnnssl error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted. Finished outputs are kept; rerun the same command to resume.", file=sys.stderr)
        return 130
    return 0


def exit_with(code: int) -> None:
    if code:
        sys.exit(code)
