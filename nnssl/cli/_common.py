"""Shared plumbing for the command-line entry points."""
import argparse
import difflib
import sys
from typing import Callable, List, Optional, Sequence

from nnssl.errors import NnsslError


class NnsslArgumentParser(argparse.ArgumentParser):
    """The parser of every nnssl command: no abbreviated options, and no misspelt option silently
    read as a short option with a glued value.

    ``allow_abbrev=False`` alone is not enough: argparse still reads ``-pretrained_weight=ck.pth``
    as ``-p retrained_weight=ck.pth`` (a short option followed by its value without a space). An
    argument that starts with a known short option followed by a letter or ``_`` is therefore
    refused (exit 2) unless it is itself a known option; ``-f0`` style values (a digit) stay valid.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        self._refuse_glued_options(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def _refuse_glued_options(self, args: List[str]) -> None:
        known = self._option_string_actions
        for arg in args:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if (len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and name not in known and arg[:2] in known
                    and (arg[2].isalpha() or arg[2] == "_")):
                close = difflib.get_close_matches(name, [o for o in known if len(o) > 2], n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                self.error(f"unrecognized option {name} ({hint}nnssl reads neither abbreviations nor a value glued to "
                           f"a short option: write '{arg[:2]} VALUE' with a space for {arg[:2]})")


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
