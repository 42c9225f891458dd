"""The ``repdiag`` command line: a thin Typer layer over the rooms.

``main()`` wraps the Typer app with repdiag's exit-code discipline: ``RepdiagError`` → one line on
stderr and exit 2; exit 1 is "regression found"; any other exception → one line, exit 3 (the
traceback with ``--debug``); Ctrl-C → 130. ``import repdiag.cli`` does not import torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape

from . import __version__
from .commands._common import STATE, stderr
from .errors import RepdiagError

app = typer.Typer(
    name="repdiag",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Why and how likely a Hugging Face text-generation model is to repeat itself.",
)

#: command modules under ``repdiag.commands``, each with ``register(app)``; mounted in this order.
COMMAND_MODULES = ("analyze", "matrix", "bounds", "metrics", "mitigations", "report", "attribute", "env")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"repdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of internal errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    STATE.quiet = quiet
    STATE.debug = debug


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"repdiag.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command group not built yet
        if exc.name != f"repdiag.commands.{_name}":
            raise
        continue
    _module.register(app)


_GLOBAL_FLAGS = ("--debug", "--quiet", "-q")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the process exit code (0 ok, 1 regression, 2 bad input, 3 internal)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # the global flags are accepted anywhere on the line, as users type them after the command
    hoisted = [a for a in args if a in _GLOBAL_FLAGS]
    args = [*hoisted, *[a for a in args if a not in _GLOBAL_FLAGS]]
    debug = "--debug" in hoisted
    try:
        # without standalone mode click returns a command's typer.Exit code instead of raising it
        code = app(args=args, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except RepdiagError as exc:
        stderr.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        stderr.print("interrupted")
        return 130
    except SystemExit as exc:  # click's usage errors in standalone_mode=False still raise
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except Exception as exc:  # noqa: BLE001 - the top-level guard of the CLI
        # Typer vendors click: recognise its usage errors by shape (show() + exit_code) and Abort by name
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":
            return 130
        if debug:
            import traceback

            traceback.print_exc()
        stderr.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(' '.join(str(exc).split()))} "
            "(rerun with --debug for the traceback)",
            highlight=False,
        )
        return 3
    return code if isinstance(code, int) else 0


def _entry() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
