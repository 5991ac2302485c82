"""Fill the editable pieces of a text with `denoise`, choosing how long each one becomes.

Length, the part an AR model cannot do in place, is chosen one of two ways (`length=`):

absorb  (default) each region gets a budget of masks larger than what it replaces; the model may write
        EOS/pad tokens inside it, and those are dropped ("pad absorption"). One denoising run. Works when
        the model has learned to emit EOS/pad for "nothing here" (SFT-style training with EOS padding,
        REFERENCE.md §1); a model that never does fills the whole budget.
search  a few candidate lengths per region (a scale of the original token count, or a geometric grid up
        to the budget for pure insertions); each candidate is filled with EOS/pad forbidden and scored by
        the ELBO of the regions and the 64 tokens after them given the text before them
        (diffusion.objective.continuation_nll); the lowest wins. Costs one denoising run + one batched scoring pass per
        candidate (the candidates are denoised together, as one batch), but does not rely on the model
        knowing EOS.
fixed   exactly the budget, EOS/pad forbidden (the "oracle length" of infill benchmarks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from unmask.decoding.denoise import DenoiseOutput, denoise_batch
from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions
from unmask.diffusion.objective import continuation_nll
from unmask.edit.canvas import Canvas, Piece, build_canvas, encode_literal, region_tokens
from unmask.edit.spans import EditError

LENGTH_MODES = ("absorb", "search", "fixed")
SEARCH_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
# a candidate is scored on its regions and this many tokens after them: how well the text after an edit
# follows it is what tells lengths apart; the rest of a long file only costs time
SEARCH_SUFFIX_TOKENS = 64


class LocalDenoiser:
    """Denoises canvases on the calling thread with an engine of its own per batch: the pipeline and the CLI.
    The server hands edits another denoiser (serve/jobs.py) whose canvases are requests of its shared engine,
    decoded step by step together with everything else it serves. Both take the same arguments and give
    the same tokens (greedy)."""

    def __init__(self, model: torch.nn.Module, prefix_store=None):
        self.model, self.prefix_store = model, prefix_store

    def __call__(self, canvases: list[list[int]], options: DecodeOptions, on_step: Callable[[StepEvent], None] | None,
                 request_ids: list[str], banned: set[int]) -> list[DenoiseOutput]:
        return denoise_batch(self.model, canvases, options, on_step, request_ids, self.prefix_store, banned=banned)


def local_denoiser(pipe, denoiser=None):
    """`denoiser` if given, else one that denoises with the pipeline's model on this thread."""
    return denoiser if denoiser is not None else LocalDenoiser(pipe.model, getattr(pipe, "prefix_store", None))


class StepRelay:
    """Passes denoise's StepEvents on with a running step count (several runs make one edit)."""

    def __init__(self, on_step: Callable[[StepEvent], None] | None, request_id: str):
        self.on_step = on_step
        self.request_id = request_id
        self.steps = 0

    def __call__(self, event: StepEvent) -> None:
        # an edit may run several fills (rounds, length candidates): only the edit's own final event is done
        if self.on_step is not None:
            self.on_step(dataclasses.replace(event, request_id=self.request_id, step=self.steps + event.step,
                                             done=False, result=None))


@dataclass
class FillOutput:
    texts: list[str]  # new text of each editable piece
    tokens: list[list[int]]  # the tokens behind them (EOS/pad dropped)
    canvas: list[int] = field(default_factory=list)  # the last filled canvas
    nfe: int = 0
    steps: int = 0
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)  # mask budget each region was given (chosen one for search)


def special_ids(pipe) -> set[int]:
    tok, c = pipe.tokenizer, pipe.config
    ids = set(tok.special.values()) | {c.mask_id, c.eos_id, c.pad_id, tok.mask_id, tok.eos_id, tok.pad_id}
    if c.bos_id is not None:
        ids.add(c.bos_id)
    return {i for i in ids if i is not None and 0 <= i < c.vocab_size}


def _run(pipe, denoiser, candidates: list[list[Piece]], options: DecodeOptions, prompt_ids, relay: StepRelay,
         allow_eos: bool, out: FillOutput) -> list[tuple[Canvas, list[int]]]:
    """Denoise one canvas per candidate piece list, all in one batch. The relay streams the first one's
    steps (one canvas on screen); NFE counts every canvas's forward passes, steps and seconds the batch's.
    Special tokens are banned per canvas (the mask id must never be *written*: the fill would never end,
    and a random or lightly trained model can put it on top)."""
    c = pipe.config
    canvases = [build_canvas(pipe.tokenizer, pieces, c.max_seq_len, prompt_ids) for pieces in candidates]
    absorbed = {c.eos_id, c.pad_id}
    banned = special_ids(pipe) - (absorbed if allow_eos else set())
    ids = [relay.request_id] + [f"{relay.request_id}/candidate-{i}" for i in range(1, len(canvases))]

    def shown(event: StepEvent) -> None:
        if event.request_id == ids[0]:
            relay(event)

    results = denoiser([cv.ids for cv in canvases], options, shown, ids, banned)
    steps = max(r.steps for r in results)
    relay.steps += steps
    out.nfe += sum(r.nfe for r in results)
    out.steps += steps
    out.seconds += max(r.seconds for r in results)
    return [(cv, r.canvas) for cv, r in zip(canvases, results)]


def fill(pipe, pieces: list[Piece], options: DecodeOptions, prompt_ids: list[int] | None = None,
         on_step: Callable[[StepEvent], None] | None = None, request_id: str = "edit", length: str = "absorb",
         candidates: list[list[int]] | None = None, relay: StepRelay | None = None,
         search_n_samples: int = 8, denoiser=None) -> FillOutput:
    """Denoise the masks of the editable pieces (their `init`) with everything else as context.

    candidates  for length="search": mask counts to try, one list per candidate with one count per
                editable piece; default: every piece's budget scaled by SEARCH_SCALES together.

    denoiser    where canvases are denoised (and its `model` scores candidates); default: LocalDenoiser

    Regions too far apart for one context window are filled window by window, left to right; regions
    filled earlier are context (with their new text) for later windows.
    """
    denoiser = local_denoiser(pipe, denoiser)
    if length not in LENGTH_MODES:
        raise EditError(f"length must be one of {', '.join(LENGTH_MODES)}, got {length!r}")
    relay = relay or StepRelay(on_step, request_id)
    room = pipe.config.max_seq_len - len(prompt_ids or [])
    groups = plan_windows(pipe.tokenizer, pieces, room)
    if len(groups) == 1:
        return _fill_window(pipe, denoiser, pieces, options, prompt_ids, relay, length, candidates,
                            search_n_samples)
    if length == "search":
        raise EditError("length search needs every region within one context window; edit fewer regions at once")
    done: dict[int, tuple[str, list[int], int]] = {}
    out = FillOutput(texts=[], tokens=[])
    for group in groups:
        sub = [p if i in group or not p.editable else Piece(done[i][0] if i in done else p.text)
               for i, p in enumerate(pieces)]
        part = _fill_window(pipe, denoiser, sub, options, prompt_ids, relay, length, None, search_n_samples)
        for i, text, tokens, n in zip(sorted(group), part.texts, part.tokens, part.lengths):
            done[i] = (text, tokens, n)
        out.nfe += part.nfe
        out.steps += part.steps
        out.seconds += part.seconds
        out.canvas = part.canvas
    order = [i for i, p in enumerate(pieces) if p.editable]
    out.texts = [done[i][0] for i in order]
    out.tokens = [done[i][1] for i in order]
    out.lengths = [done[i][2] for i in order]
    return out


def plan_windows(tokenizer, pieces: list[Piece], room: int) -> list[set[int]]:
    """Group the editable pieces (by index) so each group spans at most half a context window, leaving
    the other half for context around it. One group when everything fits."""
    sizes = [len(p.init) if p.editable else len(encode_literal(tokenizer, p.text)) for p in pieces]
    if sum(sizes) <= room:
        return [{i for i, p in enumerate(pieces) if p.editable}]
    groups: list[set[int]] = []
    pos, start = 0, None
    for i, (p, n) in enumerate(zip(pieces, sizes)):
        if p.editable:
            if groups and start is not None and pos + n - start <= room // 2:
                groups[-1].add(i)
            else:
                groups.append({i})
                start = pos
        pos += n
    return groups


def _fill_window(pipe, denoiser, pieces, options, prompt_ids, relay, length, candidates,
                 search_n_samples) -> FillOutput:
    c = pipe.config
    drop = {c.eos_id, c.pad_id}
    out = FillOutput(texts=[], tokens=[])
    if length == "search":
        best = None
        for canvas, filled in _run(pipe, denoiser, _search_pieces(pieces, candidates, c.mask_id), options,
                                   prompt_ids, relay, False, out):
            start, end = canvas.regions[0][0], canvas.regions[-1][1] + SEARCH_SUFFIX_TOKENS
            # the same seed for every candidate: their scores differ by the text, not by the noise
            score = continuation_nll(denoiser.model, filled[:start], filled[start:end], mc_samples=search_n_samples,
                                     batch_size=search_n_samples,
                                     generator=torch.Generator().manual_seed(options.seed or 0))
            out.nfe += 1
            if best is None or score < best[0]:
                best = (score, canvas, filled)
        _, canvas, filled = best
    else:
        [(canvas, filled)] = _run(pipe, denoiser, [pieces], options, prompt_ids, relay, length == "absorb", out)
    out.canvas = filled
    out.tokens = region_tokens(canvas, filled, drop)
    out.texts = [pipe.tokenizer.decode(t) for t in out.tokens]
    out.lengths = [e - s for s, e in canvas.regions]
    return out


def _search_pieces(pieces: list[Piece], candidates: list[list[int]] | None, mask_id: int) -> list[list[Piece]]:
    """One copy of `pieces` per candidate, each editable piece made of that many masks.

    Pieces whose init keeps original tokens (instruction mode) are not resizable: search needs masks only.
    """
    editable = [p for p in pieces if p.editable]
    if not editable:
        raise EditError("nothing to fill")
    if any(t != mask_id for p in editable for t in p.init):
        raise EditError("length search needs fully masked regions (spans or infill mode)")
    if candidates is None:
        candidates = [[max(1, round(len(p.init) * s)) for p in editable] for s in SEARCH_SCALES]
    out, seen = [], set()
    for cand in candidates:
        if len(cand) != len(editable):
            raise EditError(f"a length candidate needs {len(editable)} counts, got {len(cand)}")
        if tuple(cand) in seen:
            continue
        seen.add(tuple(cand))
        it = iter(cand)
        out.append([Piece(p.text, True, [mask_id] * next(it)) if p.editable else p for p in pieces])
    return out


def geometric_lengths(max_len: int, ratio: float = 1.5) -> list[int]:
    """1, 2, 3, 5, 7, ... up to max_len (inclusive): length candidates for a pure insertion."""
    out, x = [], 1.0
    while round(x) < max_len:
        if not out or round(x) != out[-1]:
            out.append(round(x))
        x *= ratio
    return out + [max_len]


def default_extra(n: int) -> int:
    """Extra masks an absorbing region gets beyond the n tokens it replaces: room to grow by half."""
    return max(2, math.ceil(n / 2))
