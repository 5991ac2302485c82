"""Instant Edit and infilling: rewrite chosen regions of a text in place with a diffusion model.

Three ways to choose what changes (`mode=`):
  spans        the caller names the regions (character spans, line ranges, or <<< >>> markers); each is
               re-masked with a length budget (fill.py) and denoised with the rest as context.
  auto         self-correction: tokens the model finds improbable, p(x_i | rest) < flag_below (probe.py),
               plus `neighbors` tokens either side, are re-masked and denoised; repeated until nothing is
               flagged, the text stops changing, or the round / step budget is spent.
  instruction  the instruction is the prompt (chat template when the tokenizer has one), the original text
               initialises the answer, a fraction `strength` of its tokens is re-masked (SDEdit for
               text) and denoised, with room to grow (pad absorption).

Text outside the regions is never changed, byte for byte: see canvas.py for how.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from unmask.decoding.events import StepEvent
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions
from unmask.decoding.result import GenerationResult
from unmask.edit.canvas import Piece, encode_literal, encode_with_offsets, rebuild, split_pieces
from unmask.edit.fill import FillOutput, StepRelay, default_extra, fill, geometric_lengths, local_denoiser
from unmask.edit.instruct import rewrite_by_instruction
from unmask.edit.left_to_right import auto_fix, fill_regions
from unmask.edit.options import EditOptions, split_options
from unmask.edit.probe import token_probs
from unmask.edit.spans import (EditError, Span, check_spans, extract_markers, has_markers, line_span,
                               whole_text)
from unmask.edit.suffix import Ending, fill_gap, reads_left_to_right

log = logging.getLogger(__name__)

@dataclass
class EditResult:
    text: str  # the edited text
    original: str  # the text the edit started from (markers removed)
    spans: list[Span]  # regions of `original` that were rewritten
    replacements: list[str]  # what each region became
    mode: str = "spans"
    nfe: int = 0
    steps: int = 0
    seconds: float = 0.0
    rounds: int = 1  # auto mode: correction rounds run
    lengths: list[int] = field(default_factory=list)  # token budget each region was given (last round)
    tokens: int = 0  # tokens written into the regions (left-to-right models)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def changed(self) -> bool:
        return self.text != self.original

    @property
    def middle(self) -> str:
        """Infill: the text written between prefix and suffix."""
        return "".join(self.replacements)

    def diff(self, name: str = "text", context: int = 3) -> str:
        return unified_diff(self.original, self.text, name, context)


def unified_diff(before: str, after: str, name: str = "text", context: int = 3) -> str:
    """A `patch`-compatible unified diff; line endings are kept as they are (CRLF shows as CRLF)."""
    a, b = _diff_lines(before), _diff_lines(after)
    lines = []
    for line in difflib.unified_diff(a, b, f"a/{name}", f"b/{name}", n=context):
        if not line.endswith(("\n", "\r")):
            line += "\n\\ No newline at end of file\n"
        lines.append(line)
    return "".join(lines)


def _diff_lines(text: str) -> list[str]:
    # only \r\n, \r and \n end a line (as for --lines): str.splitlines also splits at form feeds, \x85
    # and U+2028, which would cut a line in two and put "No newline at end of file" in mid-diff
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z", text)


# --- choosing the regions ---------------------------------------------------------------------------

def _as_list(specs) -> list:
    """Accept one spec ("3:8", "2-4", (3, 8), 5) or a list of them."""
    if specs is None:
        return []
    if isinstance(specs, (str, int)) or (isinstance(specs, tuple) and len(specs) == 2
                                          and all(isinstance(x, int) for x in specs)):
        return [specs]
    return list(specs)


def resolve_regions(text: str, spans: Iterable[Any] | None, lines: Iterable[Any] | None,
                    markers: bool = True, required: bool = True) -> tuple[str, list[Span]]:
    """(text without markers, sorted checked spans) from spans, line ranges and/or <<< >>> markers."""
    spans = _as_list(spans)
    lines = _as_list(lines)
    if markers and has_markers(text):
        if spans or lines:
            raise EditError("give either <<< >>> markers in the text or spans/line ranges, not both")
        text, found = extract_markers(text)
        spans = found
    if not text:
        raise EditError("the text is empty: there is nothing to edit (use infill to write from nothing)")
    spans = spans + [line_span(text, spec) for spec in lines]
    if not spans:
        if required:
            raise EditError("no region to edit: give spans (START:END), line ranges (A-B) or <<< >>> markers")
        return text, []
    return text, check_spans(text, spans)


class OriginMap:
    """For each character of the current text, the index of the original character it still is (-1 once
    the model wrote it), so auto mode can report which regions of the original its rounds rewrote."""

    def __init__(self, text: str):
        self.text = text
        self.origin = list(range(len(text)))

    def apply(self, edits: list[tuple[int, int, str]]) -> None:
        """Replace [s, e) of the current text by new text; edits sorted, non-overlapping."""
        for s, e, new in reversed(edits):
            self.text = self.text[:s] + new + self.text[e:]
            self.origin[s:e] = [-1] * len(new)

    def changes(self, original: str) -> tuple[list[Span], list[str]]:
        """Regions of `original` that differ, and their new text (an identical rewrite is no change)."""
        spans, repl, pos, new = [], [], 0, []
        for ch, o in list(zip(self.text, self.origin)) + [("", len(original))]:
            if o < 0:
                new.append(ch)
                continue
            if (o != pos or new) and original[pos:o] != "".join(new):
                spans.append((pos, o))
                repl.append("".join(new))
            pos, new = o + 1, []
        return spans, repl


# --- the three modes --------------------------------------------------------------------------------

def _decode_options(pipe, options: DecodeOptions | None, overrides: dict[str, Any]) -> DecodeOptions:
    unknown = sorted(set(overrides) - DecodeOptions.fields())
    if unknown:
        raise EditError(f"unknown option(s) {', '.join(unknown)}; decoding options are "
                        f"{', '.join(sorted(DecodeOptions.fields()))}")
    return pipe.options(options, **overrides)


def _check_model(pipe) -> None:
    if not layout_for(pipe.config).diffusion:
        raise EditError("edit and infill need a diffusion (bidirectional or block-causal) model; "
                        "this is a causal AR model")


def edit_text(pipe, text: str, spans: Iterable[Any] | None = None, lines: Iterable[Any] | None = None,
              edit: EditOptions | None = None, options: DecodeOptions | None = None,
              on_step: Callable[[StepEvent], None] | None = None, request_id: str = "edit", denoiser: Any = None,
              **overrides: Any) -> EditResult:
    """Edit `text` in place; see the module docstring for the modes.

    spans/lines   regions (START:END characters / A-B 1-based lines, as strings or pairs); in auto mode they
                  limit where corrections may happen; in instruction mode they limit what is re-noised
    edit          EditOptions: mode, instruction, strength, flag_below, rounds, length, ... (edit/options.py)
    options       DecodeOptions for the denoiser (block length, policy, steps, temperature, seed...)
    overrides     keywords for either: EditOptions' fields go to `edit`, the rest to `options`
    on_step       receives every StepEvent (step counted over the whole edit) and a final one with done=True
    denoiser      where canvases are denoised and text is probed (edit/fill.py LocalDenoiser by default;
                  the server's runs them as requests of its shared engine)
    """
    edit, overrides = split_options(edit, overrides)
    edit.check()
    if not isinstance(text, str):
        raise EditError("edit needs a str")
    _check_model(pipe)
    options = _decode_options(pipe, options, overrides)
    relay = StepRelay(on_step, request_id)
    denoiser = local_denoiser(pipe, denoiser)
    t0 = time.perf_counter()
    if _left_to_right(pipe, edit.suffix_scoring):
        result = _edit_left_to_right(pipe, text, spans, lines, edit, options)
    elif edit.mode == "spans":
        text, regions = resolve_regions(text, spans, lines, edit.markers)
        result = _edit_spans(pipe, denoiser, text, regions, edit, options, relay)
    else:
        text, regions = resolve_regions(text, spans, lines, edit.markers, required=False)
        edit_mode = _edit_instruction if edit.mode == "instruction" else _edit_auto
        result = edit_mode(pipe, denoiser, text, regions or [whole_text(text)], edit, options, relay)
    result.seconds = time.perf_counter() - t0
    if on_step is not None:
        final = GenerationResult(tokens=encode_literal(pipe.tokenizer, "".join(result.replacements)),
                                 text=result.text, nfe=result.nfe, steps=result.steps, seconds=result.seconds,
                                 finish_reason="stop")
        on_step(StepEvent(request_id, result.steps, [], 0, done=True, result=final))
    return result


def _mask_pieces(pipe, pieces: list[Piece], extra_tokens: int | None) -> list[Piece]:
    """Give every editable piece a budget of masks: its own token count + extra."""
    mask = pipe.config.mask_id
    for p in pieces:
        if p.editable:
            n = len(encode_literal(pipe.tokenizer, p.text))
            extra = default_extra(n) if extra_tokens is None else extra_tokens
            p.init = [mask] * max(1, n + extra)
    return pieces


def _edit_spans(pipe, denoiser, text: str, regions: list[Span], edit: EditOptions, options: DecodeOptions,
                relay: StepRelay) -> EditResult:
    pieces = _mask_pieces(pipe, split_pieces(text, regions), edit.extra_tokens)
    out = fill(pipe, pieces, options, relay=relay, length=edit.length, denoiser=denoiser)
    return _result(text, pieces, regions, out, "spans")


def _result(text: str, pieces: list[Piece], regions: list[Span], out: FillOutput, mode: str) -> EditResult:
    return EditResult(text=rebuild(pieces, out.texts), original=text, spans=list(regions),
                      replacements=list(out.texts), mode=mode, nfe=out.nfe, steps=out.steps, lengths=out.lengths)


def instruction_prompt(pipe, instruction: str) -> list[int]:
    tok = pipe.tokenizer
    if tok.chat_template:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": instruction}]))
    return tok.encode(instruction.rstrip("\n") + "\n\n")


def _edit_instruction(pipe, denoiser, text: str, regions: list[Span], edit: EditOptions, options: DecodeOptions,
                      relay: StepRelay) -> EditResult:
    c = pipe.config
    gen = torch.Generator().manual_seed(options.seed if options.seed is not None else 0)
    pieces = split_pieces(text, regions)
    for p in pieces:
        if p.editable:
            ids = encode_literal(pipe.tokenizer, p.text)
            # SDEdit for text: re-noise a `strength` fraction of the original tokens, add room to grow
            k = round(edit.strength * len(ids))
            noised = list(ids)
            for i in torch.randperm(len(ids), generator=gen)[:k].tolist():
                noised[i] = c.mask_id
            extra = default_extra(len(ids)) if edit.extra_tokens is None else edit.extra_tokens
            p.init = noised + [c.mask_id] * extra
            if c.mask_id not in p.init:  # strength 0 and no room: nothing to denoise, keep one slot open
                p.init.append(c.mask_id)
    out = fill(pipe, pieces, options, prompt_ids=instruction_prompt(pipe, edit.instruction), relay=relay,
               length="absorb", denoiser=denoiser)
    return _result(text, pieces, regions, out, "instruction")


def flag_improbable(probs: torch.Tensor, allowed: torch.Tensor, threshold: float, neighbors: int,
                    max_fraction: float) -> torch.Tensor:
    """Tokens to re-mask: p < threshold among `allowed`, at most max_fraction of them (lowest first),
    widened by `neighbors` tokens either side (still within `allowed`)."""
    L = probs.shape[0]
    cand = (probs < threshold) & allowed
    cap = max(1, int(max_fraction * int(allowed.sum())))
    if int(cand.sum()) > cap:
        keep = torch.topk(torch.where(cand, -probs, torch.full_like(probs, -math.inf)), cap).indices
        cand = torch.zeros(L, dtype=torch.bool)
        cand[keep] = True
    flagged = cand.clone()
    for d in range(1, neighbors + 1):
        flagged[d:] |= cand[:-d]
        flagged[:-d] |= cand[d:]
    return flagged & allowed


SURE_OF_ANOTHER = 0.9  # left-context models: a token is suspect only where the model was this sure of its own choice


def _correction_scores(model, ids: list[int], stride: int | None) -> tuple[torch.Tensor, int]:
    """Per-token scores auto mode flags below its threshold. A model that sees the whole text scores
    p(x_i | rest). One that sees only the left (causal inside its blocks) finds every name at its
    definition and a text's first tokens improbable, so for it a token is suspect only where it was sure
    of another one (a typo of a name used before), and the first token, which has no context, never is."""
    if not layout_for(model.config).left_to_right:  # edits refuse causal models: this is causal blocks
        return token_probs(model, ids, stride=stride)
    probs, best, passes = token_probs(model, ids, stride=stride, best=True)
    probs = torch.where(best >= SURE_OF_ANOTHER, probs, torch.ones_like(probs))
    probs[0] = 1.0
    return probs, passes


def _edit_auto(pipe, denoiser, text: str, regions: list[Span], edit: EditOptions, options: DecodeOptions,
               relay: StepRelay) -> EditResult:
    # `outer` keeps the caller's regions apart from the context for the whole loop: each round edits
    # inside the editable pieces only, so the context stays the original characters.
    outer = split_pieces(text, regions)
    origin = OriginMap(text)
    nfe = steps = rounds = 0
    lengths: list[int] = []
    for rounds in range(1, edit.max_rounds + 1):
        current = "".join(p.text for p in outer)
        ids, offsets = encode_with_offsets(pipe.tokenizer, current)
        if not ids:
            break
        probs, passes = _correction_scores(denoiser.model, ids, edit.probe_stride)
        nfe += passes
        flagged = flag_improbable(probs, _editable_tokens(outer, offsets), edit.flag_below, edit.neighbors,
                                  edit.max_fraction)
        if not bool(flagged.any()):
            log.debug("auto edit: nothing below p=%s after %d round(s)", edit.flag_below, rounds - 1)
            rounds -= 1
            break
        inner, owners = _flagged_pieces(outer, _token_spans(flagged, offsets))
        inner = _mask_pieces(pipe, inner, edit.extra_tokens or 0)
        out = fill(pipe, inner, options, relay=relay, length=edit.length, denoiser=denoiser)
        nfe, steps, lengths = nfe + out.nfe, steps + out.steps, out.lengths
        outer = _rewritten(outer, inner, owners, out.texts, origin)
        if "".join(p.text for p in outer) == current or (edit.max_steps is not None and steps >= edit.max_steps):
            break
    changed, repl = origin.changes(text)
    return EditResult(text="".join(p.text for p in outer), original=text, spans=changed, replacements=repl,
                      mode="auto", nfe=nfe, steps=steps, rounds=rounds, lengths=lengths)


def _editable_tokens(outer: list[Piece], offsets: list[Span]) -> torch.Tensor:
    """Which tokens auto mode may correct: those entirely inside an editable piece."""
    bounds, pos = [], 0
    for p in outer:
        if p.editable:
            bounds.append((pos, pos + len(p.text)))
        pos += len(p.text)
    return torch.tensor([any(bs <= s and e <= be for bs, be in bounds) for s, e in offsets], dtype=torch.bool)


def _token_spans(flagged: torch.Tensor, offsets: list[Span]) -> list[Span]:
    """Flagged tokens as character spans of the text, touching ones merged."""
    spans: list[Span] = []
    for i in flagged.nonzero().flatten().tolist():
        s, e = offsets[i]
        if spans and s <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(e, spans[-1][1]))
        else:
            spans.append((s, e))
    return spans


def _flagged_pieces(outer: list[Piece], spans: list[Span]) -> tuple[list[Piece], list[int]]:
    """Context pieces and the flagged regions, in text order, and for each the outer piece it belongs to."""
    inner: list[Piece] = []
    owners: list[int] = []
    pos = 0
    for k, p in enumerate(outer):
        lo, hi = pos, pos + len(p.text)
        pos = hi
        if not p.editable:
            inner.append(Piece(p.text))
            owners.append(k)
            continue
        mine = [(max(s, lo) - lo, min(e, hi) - lo) for s, e in spans if s < hi and e > lo]
        for q in split_pieces(p.text, mine):
            inner.append(q)
            owners.append(k)
    return inner, owners


def _rewritten(outer: list[Piece], inner: list[Piece], owners: list[int], texts: list[str],
               origin: OriginMap) -> list[Piece]:
    """The outer pieces with their flagged regions replaced by `texts`; `origin` follows the edits."""
    new_texts = iter(texts)
    rebuilt = ["" for _ in outer]
    edits, pos = [], 0
    for q, k in zip(inner, owners):
        if q.editable:
            new = next(new_texts)
            edits.append((pos, pos + len(q.text), new))
            rebuilt[k] += new
        else:
            rebuilt[k] += q.text
        pos += len(q.text)
    origin.apply(edits)
    outer = [Piece(r, p.editable) for r, p in zip(rebuilt, outer)]
    assert "".join(p.text for p in outer) == origin.text, "auto edit bookkeeping"
    return outer


# --- models that read left to right (left_to_right.py) ----------------------------------------------

def _left_to_right(pipe, suffix_scoring: bool | None) -> bool:
    return suffix_scoring is not False and reads_left_to_right(pipe.config)


def _edit_left_to_right(pipe, text: str, spans, lines, edit: EditOptions, options: DecodeOptions) -> EditResult:
    seed, mode = options.seed or 0, edit.mode
    if mode == "spans":
        text, regions = resolve_regions(text, spans, lines, edit.markers)
        f = fill_regions(pipe, text, regions, edit.extra_tokens, seed=seed)
        return EditResult(text=f.text, original=text, spans=f.spans, replacements=f.replacements, mode=mode,
                          nfe=f.passes, steps=f.passes, tokens=f.tokens)
    text, regions = resolve_regions(text, spans, lines, edit.markers, required=False)
    regions = regions or [whole_text(text)]
    if mode == "instruction":
        r = rewrite_by_instruction(pipe, text, regions, edit.instruction, options)
        return EditResult(text=r.text, original=text, spans=r.spans, replacements=r.replacements, mode=mode,
                          nfe=r.steps, steps=r.steps, tokens=r.tokens)
    origin, current, passes, rounds, settled = OriginMap(text), text, 0, 0, []
    for rounds in range(1, edit.max_rounds + 1):
        fixed = auto_fix(pipe, current, regions, edit.flag_below, edit.max_fraction, seed, settled)
        passes += fixed.passes
        if not fixed.changed:
            break
        edits = [(s, e, r) for (s, e), r in zip(fixed.changed, fixed.replacements)]
        origin.apply(edits)
        regions = _shift_regions(regions, edits)
        settled = _shift_regions(settled + fixed.kept, edits)  # kept words stay decided in later rounds
        current = fixed.text
    spans_changed, replacements = origin.changes(text)
    return EditResult(text=current, original=text, spans=spans_changed, replacements=replacements, mode="auto",
                      nfe=passes, steps=passes, rounds=rounds,
                      tokens=sum(len(encode_literal(pipe.tokenizer, r)) for r in replacements))


def _shift_regions(regions: list[Span], edits: list[tuple[int, int, str]]) -> list[Span]:
    """The regions after `edits` (inside them, sorted) changed the text's length."""
    def moved(pos: int, inclusive: bool) -> int:
        return pos + sum(len(new) - (e - s) for s, e, new in edits if (e <= pos if inclusive else s < pos))
    return [(moved(s, True), moved(e, False)) for s, e in regions]


def _infill_left_to_right(pipe, prefix, suffix, max_new_tokens, max_lines, options, on_step, request_id,
                          t0) -> EditResult:
    choice = fill_gap(pipe, prefix, suffix, Ending(suffix, max_lines - 1), max_tokens=max_new_tokens,
                      seed=options.seed or 0)
    result = EditResult(text=prefix + choice.middle + suffix, original=prefix + suffix,
                        spans=[(len(prefix), len(prefix))], replacements=[choice.middle], mode="infill",
                        nfe=choice.passes, steps=choice.passes, lengths=[choice.tokens], tokens=choice.tokens)
    result.seconds = time.perf_counter() - t0
    if on_step is not None:
        final = GenerationResult(tokens=encode_literal(pipe.tokenizer, choice.middle), text=choice.middle,
                                 nfe=result.nfe, steps=result.steps, seconds=result.seconds, finish_reason="stop")
        on_step(StepEvent(request_id, result.steps, [], 0, done=True, result=final))
    return result


# --- infill -----------------------------------------------------------------------------------------

def infill_text(
    pipe,
    prefix: str,
    suffix: str,
    max_new_tokens: int = 64,
    length: str = "absorb",
    options: DecodeOptions | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    request_id: str = "infill",
    search_lengths: Sequence[int] | None = None,
    denoiser: Any = None,
    suffix_scoring: bool | None = None,
    max_lines: int = 1,
    **overrides: Any,
) -> EditResult:
    """Write the middle between `prefix` and `suffix`; its length is the model's choice, at most
    `max_new_tokens` (absorb: EOS/pad inside the budget are dropped; search: geometric candidates up to
    the budget scored by the ELBO; fixed: exactly max_new_tokens). `result.middle` is the new text,
    `result.text` the whole text. `denoiser`: as for edit_text. On a model that reads left to right the
    middle is chosen by suffix scoring (suffix_scoring None or True; edit/suffix.py): at most `max_lines`
    lines, ending where the suffix can follow."""
    _check_model(pipe)
    if max_new_tokens < 1:
        raise EditError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_lines < 1:
        raise EditError(f"max_lines must be >= 1, got {max_lines}")
    options = _decode_options(pipe, options, overrides)
    relay = StepRelay(on_step, request_id)
    t0 = time.perf_counter()
    if _left_to_right(pipe, suffix_scoring):
        return _infill_left_to_right(pipe, prefix, suffix, max_new_tokens, max_lines, options, on_step,
                                     request_id, t0)
    text = prefix + suffix
    pieces = ([Piece(prefix)] if prefix else []) + [Piece("", True, [pipe.config.mask_id] * max_new_tokens)]
    pieces += [Piece(suffix)] if suffix else []
    candidates = None
    if length == "search":
        candidates = [[n] for n in (search_lengths or geometric_lengths(max_new_tokens)) if 1 <= n <= max_new_tokens]
        if not candidates:
            raise EditError(f"no search length within 1..{max_new_tokens}")
    out = fill(pipe, pieces, options, relay=relay, length=length, candidates=candidates,
               denoiser=local_denoiser(pipe, denoiser))
    result = _result(text, pieces, [(len(prefix), len(prefix))], out, "infill")
    result.seconds = time.perf_counter() - t0
    if on_step is not None:
        final = GenerationResult(tokens=out.tokens[0], text=result.middle, nfe=result.nfe, steps=result.steps,
                                 seconds=result.seconds, finish_reason="stop")
        on_step(StepEvent(request_id, result.steps, out.canvas, len(out.canvas), done=True, result=final))
    return result
