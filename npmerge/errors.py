"""The errors npmerge raises on bad input: one message that names the file, tensor
and model concerned, an optional hint saying what to do, and a process exit code.

Exit codes follow docs/format-and-safety.md §4 so that scripts can tell a typo in a
recipe (2) from a corrupt download (3), incompatible models (4) or a full disk (5).
Anything else escaping the CLI is a bug in npmerge (1).
"""

from __future__ import annotations

import reprlib

SHOWN = 80  # characters of a user's value quoted in a message


def shown(value) -> str:
    """repr(value) cut to SHOWN characters: a message quotes what was given, never
    megabytes of it (a recipe value may be a huge list or an expanded alias)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, SHOWN, SHOWN
    text = r.repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


class NpmergeError(Exception):
    """Base class: a user-facing failure with a message and an optional hint."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class RecipeError(NpmergeError):
    """Bad parameters, flags or recipe YAML; also a bad output location choice."""

    exit_code = 2
    code = "usage"


class InvalidCheckpoint(NpmergeError):
    """A file or directory that is not a valid safetensors checkpoint."""

    exit_code = 3
    code = "invalid_checkpoint"


class IncompatibleModels(NpmergeError):
    """Valid checkpoints that cannot be merged together (names, shapes, dtypes, values)."""

    exit_code = 4
    code = "incompatible_models"


class OutputError(NpmergeError):
    """The output cannot be written: not writable, disk full, locked."""

    exit_code = 5
    code = "output"


class VerifyFailed(NpmergeError):
    """`npmerge verify`: the output's files differ from its report, or from a re-run of its recipe."""

    exit_code = 6
    code = "verify_failed"


class BudgetError(RecipeError):
    """--max-memory is too small to process even one chunk."""

    code = "budget"
