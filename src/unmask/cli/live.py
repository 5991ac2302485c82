"""Terminal view of the denoising: masked positions shown as ░, filling in step by step (rich Live)."""

from __future__ import annotations

from rich.text import Text

from unmask.tokenizer import Tokenizer

MASK_GLYPH = "░"


def render_canvas(tokenizer: Tokenizer, canvas: list[int], style_new: set[int] | None = None) -> Text:
    """Decode runs of committed tokens together (byte-level BPE pieces may split a character) and show
    each mask as one glyph; positions in `style_new` (just committed) are highlighted."""
    text = Text()
    run: list[int] = []
    run_new = False

    def flush() -> None:
        if run:
            text.append(tokenizer.decode(run), style="bold green" if run_new else "")
            run.clear()

    for i, tok in enumerate(canvas):
        is_new = bool(style_new and i in style_new)
        if tok == tokenizer.mask_id:
            flush()
            text.append(MASK_GLYPH, style="dim cyan")
            continue
        if run and is_new != run_new:
            flush()
        run_new = is_new
        run.append(tok)
    flush()
    return text
