"""Instant Edit and infilling on top of the denoiser (decoding.denoise).

    edit_text(pipe, text, spans=..., lines=..., mode="spans" | "auto" | "instruction", ...) -> EditResult
    infill_text(pipe, prefix, suffix, max_new_tokens=...) -> EditResult   (result.middle)

Pipeline.edit / Pipeline.infill call these. Text outside the edited regions is never changed.
"""

from unmask.edit.editor import EditResult, edit_text, infill_text, unified_diff
from unmask.edit.files import read_text_exact, write_in_place
from unmask.edit.spans import EditError

__all__ = ["EditError", "EditResult", "edit_text", "infill_text", "read_text_exact", "unified_diff",
           "write_in_place"]
