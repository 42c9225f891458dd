"""Errors a user can cause, each with a one-line fix.

The CLI prints ``error: <message>`` and exits with :attr:`RepdiagError.exit_code` (2 for usage and
bad input). Exit code 1 is reserved for "regression found" (``repdiag compare``) and 3 for internal
errors, so a crash never looks like a regression.
"""

from __future__ import annotations

__all__ = [
    "RepdiagError",
    "UsageError",
    "BadInputError",
    "ModelLoadError",
    "OfflineModelError",
    "UnsupportedModelError",
    "MatrixFormatError",
    "PolicyError",
    "RecordError",
    "MissingExtraError",
]


class RepdiagError(Exception):
    """Base class for errors caused by the user's input; the message is one line with the fix."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line

    @property
    def message(self) -> str:
        return str(self)


class UsageError(RepdiagError):
    """A command-line argument or API parameter is invalid."""


class BadInputError(RepdiagError):
    """An input file (prompts, generations, report) is missing, empty or malformed."""


class ModelLoadError(RepdiagError):
    """A model or tokenizer could not be loaded."""


class OfflineModelError(ModelLoadError):
    """A hub id was requested while offline and it is not in the local cache."""


class UnsupportedModelError(ModelLoadError):
    """The model cannot generate text (for example an encoder-only BERT)."""


class MatrixFormatError(RepdiagError):
    """A transition-matrix file or array is not a valid row-stochastic matrix."""


class PolicyError(RepdiagError):
    """An unknown decoding policy / mitigation or a parameter out of range."""


class RecordError(RepdiagError):
    """A training record for attribution is missing, incomplete or does not match the model."""


class MissingExtraError(RepdiagError):
    """An optional dependency is not installed; the message names the install command."""
