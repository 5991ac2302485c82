"""Token canvases built from character pieces, and text rebuilt from them without touching the context.

An edit splits the text into pieces: context pieces (kept) and editable pieces (rewritten). Each piece
is tokenized on its own and the canvas is their concatenation, so a BPE merge can never cross a piece
border. The output is rebuilt from the *original characters* of the context pieces plus the decoded
editable pieces; context tokens are never decoded back to text. That makes "bytes outside the regions
are unchanged" true by construction, for any tokenizer (CRLF, non-ASCII, text that does not round-trip).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

from unmask.edit.spans import EditError, Span
from unmask.tokenizer import Tokenizer

_literal_cache: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()


def _literal_hf(tokenizer: Tokenizer):
    # A copy that encodes special-token strings as plain text: a file that contains "<|mask|>" must not
    # put a real mask (or EOS) into the context. A copy, so the shared tokenizer is never mutated.
    hf = _literal_cache.get(tokenizer)
    if hf is None:
        hf = copy.deepcopy(tokenizer.hf)
        hf.encode_special_tokens = True
        _literal_cache[tokenizer] = hf
    return hf


def encode_literal(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of user text, special-token strings included as ordinary characters."""
    return _literal_hf(tokenizer).encode(text, add_special_tokens=False).ids if text else []


def encode_with_offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[Span]]:
    """Literal ids and the character span of each token (a multi-byte character split over several
    byte-level tokens gives each of them the whole character)."""
    if not text:
        return [], []
    enc = _literal_hf(tokenizer).encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]


@dataclass
class Piece:
    text: str  # the original characters of this piece
    editable: bool = False
    init: list[int] = field(default_factory=list)  # editable: starting tokens, mask_id where the model writes


@dataclass
class Canvas:
    ids: list[int]  # prompt + body, mask_id where the model writes
    regions: list[Span]  # canvas [start, end) of each editable piece, in order
    prompt_len: int = 0
    dropped_left: int = 0  # context tokens cut off on the left to fit the model (0 when it fits)


def build_canvas(tokenizer: Tokenizer, pieces: list[Piece], max_len: int, prompt_ids: list[int] | None = None) -> Canvas:
    """Concatenate the pieces' tokens after `prompt_ids`; keep a window of context around the regions
    when the whole text does not fit in the model's context."""
    prompt = list(prompt_ids or [])
    body: list[int] = []
    regions: list[Span] = []
    context = ""  # consecutive context pieces are tokenized as one string, as the model saw text in training
    for p in pieces:
        if p.editable:
            body += encode_literal(tokenizer, context)
            context = ""
            regions.append((len(body), len(body) + len(p.init)))
            body += p.init
        else:
            context += p.text
    body += encode_literal(tokenizer, context)
    room = max_len - len(prompt)
    left = 0
    if len(body) > room:
        lo, hi = regions[0][0], regions[-1][1]
        if hi - lo > room:
            raise EditError(f"the edited regions span {hi - lo} tokens (with their budget), more than the "
                            f"{room} the model context of {max_len} leaves; edit a smaller part at a time")
        # center the regions in the window: the nearest context matters most
        left = min(max(0, lo - (room - (hi - lo)) // 2), len(body) - room)
        body = body[left : left + room]
    offset = len(prompt) - left
    return Canvas(ids=prompt + body, regions=[(s + offset, e + offset) for s, e in regions],
                  prompt_len=len(prompt), dropped_left=left)


def region_tokens(canvas: Canvas, ids: list[int], drop: set[int]) -> list[list[int]]:
    """The tokens the model wrote in each region of the filled canvas `ids`, minus `drop` (EOS/pad:
    the length the model chose inside an over-long region)."""
    return [[t for t in ids[s:e] if t not in drop] for s, e in canvas.regions]


def rebuild(pieces: list[Piece], new_texts: list[str]) -> str:
    """Original characters of context pieces + new text of editable pieces, in order."""
    it = iter(new_texts)
    out = [next(it) if p.editable else p.text for p in pieces]
    assert next(it, None) is None, "one new text per editable piece"
    return "".join(out)


def split_pieces(text: str, spans: list[Span]) -> list[Piece]:
    """Context / editable pieces for sorted, non-overlapping `spans` (empty spans = insertion points)."""
    pieces, pos = [], 0
    for s, e in spans:
        if s > pos:
            pieces.append(Piece(text[pos:s]))
        pieces.append(Piece(text[s:e], editable=True))
        pos = e
    if pos < len(text):
        pieces.append(Piece(text[pos:]))
    return pieces
