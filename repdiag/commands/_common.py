"""Shared pieces of the command modules: consoles, output formats, JSON printing, progress bars."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .._atomic import dumps_json

__all__ = ["stdout", "stderr", "OutputFormat", "print_json", "progress_bar", "STATE"]

#: data goes to stdout; when it is not a terminal (CI logs, files) tables get 120 columns, not rich's 80.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True, soft_wrap=True)  # an error stays one line in CI logs


class _State:
    """Global flags set by the root callback (``--quiet``, ``--debug``)."""

    quiet: bool = False
    debug: bool = False


STATE = _State()


class OutputFormat(str, enum.Enum):
    table = "table"
    json = "json"


def print_json(obj: Any) -> None:
    """Print ``obj`` as deterministic JSON on stdout (nothing else goes to stdout)."""
    sys.stdout.write(dumps_json(obj))
    sys.stdout.flush()


def progress_bar(transient: bool = True) -> Progress:
    """A rich progress bar on stderr; disabled with ``--quiet`` (and by rich when not a TTY)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=transient,
        disable=STATE.quiet,
    )


def existing_file(path: Path, what: str = "file") -> Path:
    """Return ``path`` if it is a readable file, else raise a one-line ``BadInputError``."""
    from ..errors import BadInputError

    if not path.exists():
        raise BadInputError(f"{what} {str(path)!r} does not exist: check the path")
    if path.is_dir():
        raise BadInputError(f"{what} {str(path)!r} is a folder, not a file")
    return path
