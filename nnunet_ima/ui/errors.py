"""The one error and warning line of every command of the project.

    <program>: error: <message>          (stderr, exit code 2)
    <program>: warning: <message>        (stderr; e.g. an old spelling that still works)

>>> raise SystemExit(report_error("nnunet-ima-train", "invalid nnunet-ima trainer settings: ..."))
"""
from __future__ import annotations

import sys

#: exit code of a usage error (argparse's, and every command's here)
USAGE_EXIT = 2


class UsageError(ValueError):
    """A bad command-line value; the message is the one line the user sees (after ``<program>: error:``)."""


def usage_error(flag: str, value, expected: str) -> UsageError:
    """``--epochs 0: expected an integer >= 1``: the argument, the value given and what is expected."""
    return UsageError(f"{flag} {value}: expected {expected}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n"))


def report_error(program: str, message) -> int:
    """Print ``<program>: error: <message>`` as one line on stderr; returns the exit code (2)."""
    print(f"{program}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    return USAGE_EXIT


def warn(program: str, message) -> None:
    """Print ``<program>: warning: <message>`` as one line on stderr."""
    print(f"{program}: warning: {_one_line(message)}", file=sys.stderr, flush=True)
