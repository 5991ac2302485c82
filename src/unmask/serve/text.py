"""Denoising states as clients see them: a canvas with its masks shown (`diffusing` streams, edits, the page).
The text of a finished or growing answer is the front end's (decoding/detokenize.py)."""

from __future__ import annotations

from collections.abc import Sequence

from unmask.decoding.detokenize import unheal
from unmask.tokenizer import Tokenizer

MASK_PLACEHOLDER = "░"  # how a still-masked position is shown in `diffusing` streams and on the page


def render_canvas(tokenizer: Tokenizer, canvas: Sequence[int], mask_id: int, eos_id: int | None,
                  placeholder: str = MASK_PLACEHOLDER, hide: frozenset[int] = frozenset(),
                  skip: str = "") -> tuple[str, list[str | None]]:
    """(text with one placeholder per masked position, per-position pieces with None for a mask).

    Rendering stops at the first committed `eos_id` (None: never): everything after it is cut from the final
    answer anyway. Tokens in `hide` (an edit's absorbed EOS/pad) render as "". Runs of committed tokens are
    decoded together so multi-token characters come out whole. `skip`: a healed prompt's text, taken off
    the first position."""
    canvas = list(canvas)
    if eos_id is not None and eos_id in canvas:
        canvas = canvas[: canvas.index(eos_id)]
    parts: list[str] = []
    run: list[int] = []
    for t in canvas:
        if t in hide:
            continue
        if t == mask_id:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(placeholder)
        else:
            run.append(t)
    if run:
        parts.append(tokenizer.decode(run))
    pieces = [None if t == mask_id else "" if t in hide else tokenizer.decode([t]) for t in canvas]
    if skip and pieces and pieces[0] is not None:
        pieces[0] = unheal(pieces[0], skip)
        parts[0] = unheal(parts[0], skip)
    return "".join(parts), pieces
