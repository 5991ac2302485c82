"""CLI commands (filled in by their issue)."""

from unmask.cli.apps import app, bench_app, eval_app  # noqa: F401
