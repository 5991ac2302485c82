"""Helpers shared by command modules: model loading with a spinner, option parsing, rich output."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
out = Console()


def load_pipeline(model: Path | None, device: str | None = None, dtype: str | None = None):
    import unmask

    with console.status(f"loading {model or 'default model'} …"):
        return unmask.load(model, device=device, dtype=dtype)
