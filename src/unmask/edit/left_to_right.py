"""Editing with a model that reads text left to right (the default model: causal attention, an adapter only
at [MASK] inputs). Denoising masks in place cannot see past a region on such a model, so each mode works
from what it *can* do well: continue a prefix, and say how probable any given text is.

  spans / infill  each region is a gap filled by suffix scoring (suffix.py): proposals from the text before
                  it, the one under which the text after it is most probable wins; it ends where the region
                  ends (before a newline, or where the suffix's first characters follow)
  auto            one pass scores every token; a suspect is re-decided alone (its word as a gap), and a
                  replacement is kept only if it makes the word plus the text after it more probable by
                  AUTO_MARGIN nats, so a correct line stays as it is
  instruction     instruct.py: the rewrite decoded with drafts copied from the original, reduced to its changes

Regions are filled left to right, each with the ones before it already rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unmask.edit.canvas import encode_literal, encode_with_offsets
from unmask.edit.spans import Span
from unmask.edit.suffix import Ending, GapChoice, fill_gap, prefix_from_cache, raw_logits

MIN_REGION_TOKENS = 16  # a short region still gets room to be rewritten longer
AUTO_MARGIN = 2.0  # nats a replacement must gain over the original word (+ what follows) to be kept
SURE_OF_ANOTHER = 0.8  # a token is suspect only where the model was this sure of a different one
AUTO_SAMPLES = 2  # proposals per suspect word: greedy and one sample (the original is a candidate too)
AUTO_EXTRA_TOKENS = 4  # a word's replacement may take this many tokens more than the word


@dataclass
class Filled:
    text: str  # the whole edited text
    spans: list[Span]  # regions of the original rewritten
    replacements: list[str]
    passes: int  # forward passes
    tokens: int  # tokens written into the regions


def region_ending(region_text: str, suffix: str, max_lines: int | None = None) -> Ending:
    """A rewrite has as many lines as the region, up to twice as many (+1) when it has several."""
    n = region_text.count("\n")
    return Ending(suffix, max_lines - 1 if max_lines is not None else (2 * n + 1 if n else 0))


def fill_regions(pipe, text: str, regions: list[Span], extra_tokens: int | None, seed: int = 0,
                 max_lines: int | None = None) -> Filled:
    """Rewrite each region (left to right) as a gap between the text before and after it."""
    from unmask.edit.fill import default_extra

    out, passes, tokens, shift = text, 0, 0, 0
    replacements = []
    for s, e in regions:
        s2, e2 = s + shift, e + shift
        n = len(encode_literal(pipe.tokenizer, text[s:e]))
        budget = max(MIN_REGION_TOKENS, n + (default_extra(n) if extra_tokens is None else extra_tokens))
        choice = fill_gap(pipe, out[:s2], out[e2:], region_ending(text[s:e], out[e2:], max_lines),
                          max_tokens=budget, seed=seed)
        out = out[:s2] + choice.middle + out[e2:]
        shift += len(choice.middle) - (e - s)
        replacements.append(choice.middle)
        passes += choice.passes
        tokens += choice.tokens
    return Filled(out, list(regions), replacements, passes, tokens)


# --- auto ---------------------------------------------------------------------------------------------

@torch.no_grad()
def read_once(model, ids: list[int]):
    """One pass over the text: (cache with every token's K/V, hidden states [L, D], p(x_i | x_<i) [L],
    the top probability at each position [L]). Position 0 has no context: p = top = 1."""
    cache = model.new_cache(1, len(ids) + 64)
    x = torch.tensor([ids], device=model.output.weight.device)
    hidden = model(x, cache=cache, cache_start=0, return_hidden=True)[0]
    probs = torch.ones(len(ids))
    top = torch.ones(len(ids))
    if len(ids) > 1:
        p = raw_logits(model, hidden[:-1][None])[0].softmax(-1).cpu()
        nxt = torch.tensor(ids[1:])
        probs[1:] = p[torch.arange(len(ids) - 1), nxt]
        top[1:] = p.max(-1).values
    return cache, hidden, probs, top


def word_span(text: str, s: int, e: int) -> Span:
    """Token [s, e) as the word it belongs to: a typo is fixed as a word, not as the piece a token happens to
    be. The whitespace a token carries is not part of it, and only a token's word characters widen it."""
    is_word = lambda ch: ch.isalnum() or ch == "_"  # noqa: E731
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    if s < e and is_word(text[s]):
        while s > 0 and is_word(text[s - 1]):
            s -= 1
    if s < e and is_word(text[e - 1]):
        while e < len(text) and is_word(text[e]):
            e += 1
    return s, e


def suspects(probs: torch.Tensor, top: torch.Tensor, allowed: torch.Tensor, below: float,
             max_fraction: float) -> list[int]:
    """Token indices to re-decide: improbable (< below) where the model was sure of another token, at most
    max_fraction of the allowed tokens, least probable first."""
    cand = (probs < below) & (top >= SURE_OF_ANOTHER) & allowed
    idx = cand.nonzero().flatten().tolist()
    cap = max(1, int(max_fraction * int(allowed.sum())))
    return sorted(sorted(idx, key=lambda i: float(probs[i]))[:cap])


@dataclass
class AutoRound:
    """One round of auto mode: the new text, the spans of the old one changed and their replacements, the
    words re-decided and kept (spans of the old text), forward passes."""

    text: str
    changed: list[Span] = field(default_factory=list)
    replacements: list[str] = field(default_factory=list)
    kept: list[Span] = field(default_factory=list)
    passes: int = 0

    def shifted(self, pos: int) -> "AutoRound":
        """The same round for a text that starts `pos` characters later."""
        move = lambda spans: [(s + pos, e + pos) for s, e in spans]  # noqa: E731
        return AutoRound(self.text, move(self.changed), self.replacements, move(self.kept), self.passes)


def auto_fix(pipe, text: str, regions: list[Span], below: float, max_fraction: float, seed: int = 0,
             settled: list[Span] = (), windows: bool = True) -> AutoRound:
    """One round of auto mode on a left-to-right model. `settled`: words an earlier round re-decided and
    kept, not re-decided again (a round costs what its new suspects cost). A text longer than the context
    is read in windows of lines."""
    model, tok = pipe.model, pipe.tokenizer
    ids, offsets = encode_with_offsets(tok, text)
    if len(ids) + 64 > pipe.config.max_seq_len:
        return _auto_windows(pipe, text, regions, below, max_fraction, seed, settled) if windows else AutoRound(text)
    if len(ids) < 2:
        return AutoRound(text)
    cache, hidden, probs, top = read_once(model, ids)
    allowed = torch.tensor([any(rs <= s and e <= re_ for rs, re_ in regions) for s, e in offsets])
    result = AutoRound(text, passes=1)
    words = []
    for i in suspects(probs, top, allowed, below, max_fraction):
        span = word_span(text, *offsets[i])
        if span[1] > span[0] and span not in settled and not any(span[0] < e and s < span[1] for s, e in words) \
                and any(rs <= span[0] and span[1] <= re_ for rs, re_ in regions):
            words.append(span)
    edits = []
    for s, e in words:
        # the prefix is every token that ends before the word: its K/V are already in the cache
        k = max(1, sum(1 for _, end in offsets if end <= s))
        start = offsets[k - 1][1]
        state = (prefix_from_cache(model, cache, k, hidden[k - 1]), text[start:s])
        budget = len(encode_literal(tok, text[s:e])) + AUTO_EXTRA_TOKENS
        choice = fill_gap(pipe, text[:s], text[e:], Ending(text[e:], 0), max_tokens=budget,
                          extra=[text[s:e]], samples=AUTO_SAMPLES, seed=seed, state=state,
                          hint_samples=0, suffix_names=False)
        result.passes += choice.passes
        if choice.middle != text[s:e] and choice.score >= choice.candidates[text[s:e]] + AUTO_MARGIN:
            edits.append((s, e, choice.middle))
        else:
            result.kept.append((s, e))
    for s, e, new in reversed(edits):
        result.text = result.text[:s] + new + result.text[e:]
    result.changed = [(s, e) for s, e, _ in edits]
    result.replacements = [new for _, _, new in edits]
    return result


def _auto_windows(pipe, text, regions, below, max_fraction, seed, settled) -> AutoRound:
    """A text longer than the context: auto mode on consecutive windows of whole lines."""
    lines = text.splitlines(keepends=True)
    room = pipe.config.max_seq_len // 2
    out, total, pos, chunk = [], AutoRound(""), 0, ""
    for line in lines + [None]:
        if line is not None and len(encode_literal(pipe.tokenizer, chunk + line)) < room:
            chunk += line
            continue
        if chunk:
            local = [(max(s, pos) - pos, min(e, pos + len(chunk)) - pos) for s, e in regions
                     if s < pos + len(chunk) and e > pos]
            mine = [(s - pos, e - pos) for s, e in settled if pos <= s and e <= pos + len(chunk)]
            part = (auto_fix(pipe, chunk, local, below, max_fraction, seed, mine, windows=False) if local
                    else AutoRound(chunk)).shifted(pos)
            out.append(part.text)
            total.changed += part.changed
            total.replacements += part.replacements
            total.kept += part.kept
            total.passes += part.passes
            pos += len(chunk)
        chunk = line or ""
    total.text = "".join(out)
    return total
