"""Writing and reading training checkpoints when the disk or the files fail: what to tell the user.

torch.save given a path writes through its own C++ writer, which reports a full disk as
`[enforce fail at inline_container.cc] unexpected pos 704 vs 598`; given a Python file it raises the
system's OSError (ENOSPC). So checkpoint files are written through Python files, and a failed write is
turned into one line that names the full disk and the path.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch

from unmask.errors import UnmaskError

FULL = (errno.ENOSPC, errno.EDQUOT)
# what torch's zip writer says when a write came up short, and what Rust's I/O (safetensors) says
SHORT_WRITE = ("unexpected pos", "file write failed")
NO_SPACE = ("No space left on device", "os error 28")


def save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a write into `folder` failed because its disk is full (call before freeing anything)."""
    for err in _chain(e):
        if isinstance(err, OSError) and err.errno in FULL:
            return True
        if any(s in str(err) for s in NO_SPACE):
            return True
        if any(s in str(err) for s in SHORT_WRITE):  # no errno: ask the disk
            free = _free_bytes(folder)
            return free is not None and free < (1 << 20)
    return False


def write_failure(e: BaseException, folder: Path, latest: str | None) -> UnmaskError | None:
    """One line for a checkpoint that could not be written because the disk is full; None otherwise."""
    if not disk_full(e, folder):
        return None
    where = next((err.filename for err in _chain(e) if isinstance(err, OSError) and err.filename), None)
    kept = f"`latest` still names {latest}" if latest else "no earlier checkpoint"
    return UnmaskError(f"No space left on device: {where or folder} (checkpoint {folder.name.removeprefix('.tmp-')} "
                       f"not written; its half-written folder is removed, {kept})")
