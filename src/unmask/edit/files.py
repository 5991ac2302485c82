"""Reading and rewriting the files an edit works on, without changing a byte it did not mean to."""

from __future__ import annotations

import shutil
from pathlib import Path

from unmask.edit.spans import EditError
from unmask.io import atomic_path, atomic_write_text


def read_text_exact(path: str | Path) -> str:
    """The file's text with its line endings as they are (no newline translation)."""
    path = Path(path)
    if not path.is_file():
        raise EditError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise EditError(f"{path}: not UTF-8 text (byte {e.start}); edit works on text files") from None


def write_in_place(path: str | Path, text: str, backup: bool = True) -> Path | None:
    """Replace the file's content atomically; first copy the original to FILE.bak (also atomically).

    Either step failing leaves the original file untouched and no temporary file behind.
    Returns the backup path, if one was written.
    """
    path = Path(path)
    bak = None
    if backup:
        bak = path.with_name(path.name + ".bak")
        with atomic_path(bak) as tmp:
            shutil.copyfile(path, tmp)
    atomic_write_text(path, text)
    return bak
