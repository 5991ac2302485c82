"""Reading and rewriting the files an edit works on, without changing a byte it did not mean to."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from unmask.edit.spans import EditError
from unmask.io import atomic_path, atomic_write_text


def read_text_exact(path: str | Path) -> str:
    """The file's text with its line endings as they are (no newline translation)."""
    path = Path(path)
    if path.is_dir():
        raise EditError(f"{path}: is a directory, not a text file")
    if not path.exists():
        raise EditError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:  # not only regular files: `<(cmd)` names a pipe
            return decode_text(f.read(), str(path))
    except OSError as e:
        raise EditError(f"{path}: cannot read it ({e.strerror or e})") from None


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 bytes -> text, line endings untouched; anything else is a user error, not a traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EditError(f"{name}: not UTF-8 text (byte {e.start}); edit works on text files") from None


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
    # through a symlink: renaming over the link itself would replace it with a copy, the target unedited
    atomic_write_text(Path(os.path.realpath(path)), text)
    return bak
