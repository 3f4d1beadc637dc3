"""Errors a user can cause and fix (a config field, a data file, a checkpoint, token ids, a model
too big for the machine) derive from `UserError`. The command lines print such an error as one line
naming the problem and what was expected, and exit with status 2; a traceback is for bugs, and
shows for user errors too with --verbose or JAMBA_JAX_VERBOSE=1.
"""

from __future__ import annotations

import contextlib
import os
import sys

VERBOSE_ENV = "JAMBA_JAX_VERBOSE"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Something the user asked for that cannot work as given; the message says what was expected."""


def verbose_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def fail(message: str) -> None:
    """Prints `error: message` (one line) to stderr and exits with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors(verbose: bool = False):
    """Turns a UserError raised inside into `error: ...` and exit status 2 (unless verbose)."""
    try:
        yield
    except UserError as e:
        if verbose:
            raise
        fail(str(e))
