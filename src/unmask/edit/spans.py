"""Which characters of a text an edit may rewrite: `START:END` spans, `A-B` line ranges, `<<<`…`>>>` markers.

Everything here works on Python string indices (characters, not bytes or tokens) of the original text,
and checks its input: a bad span is a user error with a one-line message, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from unmask.errors import UnmaskError

Span = tuple[int, int]  # [start, end) in characters of the original text

OPEN_MARKER = "<<<"
CLOSE_MARKER = ">>>"
GIT_CONFLICT = re.compile(r"^<{7}(?: .*)?$", re.MULTILINE)

# a line is its content plus its terminator; \r\n, \r and \n all end a line (as universal newlines do)
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n|$)")


class EditError(UnmaskError, ValueError):
    """An edit request that cannot be carried out as asked (bad span, empty file, context overflow...)."""


def parse_span(spec: str | Sequence[int]) -> Span:
    """"START:END" (or a (start, end) pair) -> (start, end). Checks the form, not the range."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
        if not m:
            raise EditError(f"bad span {spec!r}: expected START:END in characters, e.g. 10:42")
        start, end = int(m.group(1)), int(m.group(2))
    else:
        try:
            start, end = (int(x) for x in spec)
        except (TypeError, ValueError):
            raise EditError(f"bad span {spec!r}: expected (start, end) or 'START:END'") from None
    if start > end:
        raise EditError(f"bad span {start}:{end}: START is after END")
    if start < 0:
        raise EditError(f"bad span {start}:{end}: negative offset")
    return start, end


def parse_lines(spec: str | Sequence[int] | int) -> tuple[int, int]:
    """"A-B" or "A" (1-based, inclusive) -> (A, B)."""
    if isinstance(spec, int):
        a = b = spec
    elif isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec)
        if not m:
            raise EditError(f"bad line range {spec!r}: expected A-B (1-based, inclusive), e.g. 3-7")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
    else:
        a, b = int(spec[0]), int(spec[1])
    if a < 1 or b < a:
        raise EditError(f"bad line range {a}-{b}: lines are numbered from 1 and A must not exceed B")
    return a, b


def line_bounds(text: str) -> list[tuple[int, int]]:
    """(start of line, end of its content) for every line; the terminator is not part of the content."""
    out = []
    for m in _LINE.finditer(text):
        if m.start() == len(text) and out:  # the empty match after a final newline is no line
            break
        content = m.group(0).rstrip("\r\n")
        out.append((m.start(), m.start() + len(content)))
        if m.end() == len(text):
            break
    return out


def line_span(text: str, spec: str | Sequence[int] | int) -> Span:
    """Lines A..B -> the characters from the start of line A to the end of line B's content.

    The last line's terminator stays outside the span, so the line structure after it is kept.
    """
    a, b = parse_lines(spec)
    bounds = line_bounds(text)
    if b > len(bounds):
        raise EditError(f"line range {a}-{b} is out of range: the text has {len(bounds)} line(s)")
    return max(bounds[a - 1][0], bom_length(text)), bounds[b - 1][1]


def whole_text(text: str) -> Span:
    """The region of "the whole text": all of it but a leading byte-order mark."""
    return bom_length(text), len(text)


def bom_length(text: str) -> int:
    # a UTF-8 BOM marks the file's encoding, it is not text: a region never starts before it, so an edit
    # of line 1 or of the whole file keeps it
    return 1 if text.startswith("\ufeff") else 0


def extract_markers(text: str, open_marker: str = OPEN_MARKER, close_marker: str = CLOSE_MARKER) -> tuple[str, list[Span]]:
    """Remove `<<<`…`>>>` pairs; return the text without them and the spans they enclosed.

    Only a `>>>` after an opening `<<<` closes a marker; any other `>>>` is text (a doctest prompt).
    """
    conflict = GIT_CONFLICT.search(text)
    if conflict:  # `<<<<<<<` would otherwise read as a marker that nests: say what it really is
        line = text.count("\n", 0, conflict.start()) + 1
        raise EditError(f"line {line} is a git conflict marker ({conflict.group().strip()!r}): resolve the "
                        "conflict first, or choose the region with spans or line ranges")
    out, spans, pos = [], [], 0
    n = 0  # length of the cleaned text so far
    while True:
        i = text.find(open_marker, pos)
        if i < 0:
            break
        j = text.find(close_marker, i + len(open_marker))
        if j < 0:
            raise EditError(f"marker {open_marker!r} at character {i} is never closed by {close_marker!r}")
        nested = text.find(open_marker, i + len(open_marker))
        if 0 <= nested < j:
            raise EditError(f"nested marker {open_marker!r} at character {nested}: markers cannot nest")
        out.append(text[pos:i])
        n += i - pos
        inner = text[i + len(open_marker) : j]
        out.append(inner)
        spans.append((n, n + len(inner)))
        n += len(inner)
        pos = j + len(close_marker)
    out.append(text[pos:])
    return "".join(out), spans


def has_markers(text: str, open_marker: str = OPEN_MARKER, close_marker: str = CLOSE_MARKER) -> bool:
    # a `>>>` alone marks nothing: Python doctests and REPL transcripts are full of them
    return open_marker in text


def check_spans(text: str, spans: Iterable[Span]) -> list[Span]:
    """Validate spans against `text`; return them sorted, with touching spans merged.

    Empty spans (START == END) are insertion points. Overlaps are an error: the caller meant two
    different things for the same characters.
    """
    if not text:
        raise EditError("the text is empty: there is nothing to edit (use infill to write from nothing)")
    spans = sorted(parse_span(s) for s in spans)
    if not spans:
        raise EditError("no region to edit: give spans (START:END), line ranges (A-B) or <<< >>> markers")
    for s, e in spans:
        if e > len(text):
            raise EditError(f"span {s}:{e} is out of range: the text has {len(text)} characters")
    merged: list[Span] = []
    for s, e in spans:
        if merged and (s < merged[-1][1] or (s, e) == merged[-1]):
            ps, pe = merged[-1]
            raise EditError(f"spans {ps}:{pe} and {s}:{e} overlap")
        if merged and s == merged[-1][1] and s > merged[-1][0] and e > s:
            merged[-1] = (merged[-1][0], e)  # touching non-empty spans are one region
        else:
            merged.append((s, e))
    return merged
