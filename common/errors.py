"""Errors a user can cause and fix (a config field, a data file, a checkpoint, token ids, a model
too big for the machine) derive from `UserError`. The command lines (`common.cli`) print such an error
as one line naming the problem and what was expected, and exit with status 2; a traceback is for bugs.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user asked for that cannot work as given; the message says what was expected."""
