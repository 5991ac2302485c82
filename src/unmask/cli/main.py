"""Entry point of the `unmask` command: imports every command module, turns user errors into one line."""

from __future__ import annotations

import sys

import click
import typer

from unmask.cli.apps import app
from unmask.errors import UnmaskError

# each module attaches its commands to the apps on import
from unmask.cli import core, data, train, decode, edit, serve, checkpoints, distill, gguf, quantize  # noqa: E402,F401


def _typer_usage_errors() -> tuple[type[Exception], ...]:
    """Usage errors (unknown option, bad value, missing argument) of the installed typer. Recent typer
    releases (0.29 here) vendor click as typer._click, whose exceptions are not click's: catching click's
    alone let a typo in an option end in a traceback."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # an older typer raises click's own exceptions
        return (click.ClickException,)
    return (click.ClickException, ClickException)


USAGE_ERRORS = _typer_usage_errors()


def main(argv: list[str] | None = None) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except UnmaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except USAGE_ERRORS as e:
        e.show()
        return e.exit_code
    except (click.exceptions.Exit, typer.Exit) as e:
        return e.exit_code
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, read-only file system: the system's reason and the path
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
