"""Entry point of the `unmask` command: imports every command module, turns user errors into one line."""

from __future__ import annotations

import sys

import click

from unmask.cli.apps import app
from unmask.errors import UnmaskError

# each module attaches its commands to the apps on import
from unmask.cli import core, data, train, decode, edit, serve, checkpoints, distill  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except UnmaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
