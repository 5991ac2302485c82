"""Token ids back to the text a caller sees: EOS and stop strings cut, a healed prompt's text taken off, and
OpenAI-style deltas while a canvas is still being denoised.

Diffusion commits tokens out of order, but streamed text grows left to right. `DeltaStream` therefore sends
only the committed prefix of the canvas (up to the first mask), holding back a partial UTF-8 character and
anything that could be the start of a stop string, so the concatenated deltas always equal the final text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Callable

from unmask.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what a byte-level decoder prints for an incomplete UTF-8 character


def apply_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` cut at its first stop string, and whether one was there."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def unheal(text: str, skip: str) -> str:
    """`text` without a healed prompt's last-token text `skip` at its start (decoding/healing.py)."""
    if not skip:
        return text
    if text.startswith(skip):
        return text[len(skip):]
    return "" if skip.startswith(text) else text


def stop_checker(tokenizer: Tokenizer, stop: list[str], skip: str = "") -> Callable[[list[int]], bool] | None:
    """The decoder's `stop_when` for stop strings: does the decoded committed prefix (less a healed
    prompt's `skip` text at its start) contain one?"""
    if not stop:
        return None

    def stop_when(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        text = text[len(skip):] if text.startswith(skip) else text
        return any(s in text for s in stop)

    return stop_when


def committed_prefix(canvas: Sequence[int], mask_id: int, eos_id: int | None) -> list[int]:
    """The canvas up to its first mask (or EOS): text that streaming may send."""
    prefix: list[int] = []
    for t in canvas:
        if t == mask_id or t == eos_id:
            break
        prefix.append(t)
    return prefix


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def tokens_for_text(tokenizer: Tokenizer, tokens: Sequence[int], text: str) -> int:
    """How many leading `tokens` it takes to produce `text` (a stop string may have cut the text mid-way)."""
    tokens = list(tokens)
    if tokenizer.decode(tokens) == text:
        return len(tokens)
    lo, hi = 0, len(tokens)  # smallest k whose decoded prefix covers text
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(tokens[:mid]).rstrip(REPLACEMENT)) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


def final_text(tokenizer: Tokenizer, tokens: Sequence[int], eos_id: int, stop: list[str],
               skip: str = "") -> tuple[str, list[int], bool]:
    """(text, the tokens that make it, stopped by a stop string) for a finished request; `skip` is a
    healed prompt's text at the start of the tokens, not part of the answer."""
    tokens = cut_at_eos(tokens, eos_id)
    text = unheal(tokenizer.decode(tokens), skip)
    if not stop:
        return text, tokens, False
    text, stopped = apply_stop(text, stop)
    if stopped:
        tokens = tokens[: tokens_for_text(tokenizer, tokens, skip + text)]
    return text, tokens, stopped


class DeltaStream:
    """Text deltas from successive canvases of one request (the streaming detokenizer).

    `live=False` (used with self-correction, which may rewrite committed tokens) sends everything at the end."""

    def __init__(self, tokenizer: Tokenizer, mask_id: int, eos_id: int, stop: list[str], live: bool = True,
                 skip: str = ""):
        self.tokenizer, self.mask_id, self.eos_id, self.stop, self.live = tokenizer, mask_id, eos_id, stop, live
        self.skip = skip
        self.sent = ""

    def _stable_text(self, canvas: Sequence[int]) -> str:
        prefix = committed_prefix(canvas, self.mask_id, self.eos_id)
        text = unheal(self.tokenizer.decode(prefix).rstrip(REPLACEMENT), self.skip)
        if self.stop:
            text, stopped = apply_stop(text, self.stop)
            if not stopped:  # hold back a tail that may grow into a stop string
                hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                text = text[: len(text) - hold]
        return text

    def update(self, canvas: Sequence[int]) -> str:
        if not self.live:
            return ""
        text = self._stable_text(canvas)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""

    def finish(self, text: str) -> str:
        if not text.startswith(self.sent):  # cannot happen without rewrites; a stream cannot take text back
            log.warning("final text does not extend the streamed text; sending nothing more")
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
