"""`denoise`: fill every [MASK] of a canvas, leaving all other tokens as context.

This is the primitive under generation (prompt + masks), infilling (prefix + masks + suffix) and
Instant Edit (masks wherever the text changes). Masked positions are decoded in blocks of
`block_length` consecutive masked positions, left to right, by the engine (policies, KV cache, early
stop, self-correction as set in `options`). Masks may sit anywhere: each block's window in the cache
covers it, with context on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from unmask.decoding.engine import Engine
from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions
from unmask.decoding.prefix import PrefixStore
from unmask.decoding.result import GenerationResult
from unmask.model.transformer import Transformer


@dataclass
class DenoiseOutput:
    canvas: list[int]
    nfe: int = 0
    steps: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stopped_at_eos: bool = False


def denoise(
    model: Transformer,
    canvas: Sequence[int],
    options: DecodeOptions,
    on_step: Callable[[StepEvent], None] | None = None,
    request_id: str = "0",
) -> DenoiseOutput:
    """Decode every mask of `canvas`. Events carry the whole canvas (`changed` = canvas indices).

    Early stop applies only to a masked run that reaches the end of the canvas: once a finished block of
    that run holds EOS, the rest of the run becomes EOS.
    """
    return denoise_batch(model, [canvas], options, on_step, [request_id])[0]


def denoise_batch(
    model: Transformer,
    canvases: Sequence[Sequence[int]],
    options: DecodeOptions,
    on_step: Callable[[StepEvent], None] | None = None,
    request_ids: Sequence[str] | None = None,
    prefix_store: PrefixStore | None = None,
    banned: set[int] | None = None,
) -> list[DenoiseOutput]:
    """`denoise` for several canvases (any lengths) decoded together, one forward pass per step for all:
    as fast as one canvas where the device has room (length search, candidate edits). Each canvas gets the
    tokens it would get alone (greedy); `on_step` sees every canvas's events, told apart by request id.
    `prefix_store` (block_causal models): finished context blocks kept from earlier calls (decoding/prefix.py).
    `banned`: token ids no canvas may be filled with (each request's own restriction in the engine)."""
    ids = list(request_ids) if request_ids is not None else [str(i) for i in range(len(canvases))]
    if len(ids) != len(canvases) or len(set(ids)) != len(ids):
        raise ValueError("denoise_batch needs one distinct request id per canvas")
    engine = Engine(model, max_batch=max(1, len(canvases)), max_queue=len(canvases), prefix_store=prefix_store)
    for canvas, rid in zip(canvases, ids):
        engine.submit_canvas(list(canvas), options, rid, banned=banned)
    results = {}
    while engine.has_work():
        for event in engine.step():
            if on_step is not None:
                on_step(event)
            if event.done:
                results[event.request_id] = event.result
    return [denoise_output(results[rid]) for rid in ids]


def denoise_output(r: GenerationResult) -> DenoiseOutput:
    """A finished canvas request's result (submit_canvas, whole canvas as region) as a DenoiseOutput."""
    return DenoiseOutput(canvas=r.tokens, nfe=r.nfe, steps=r.steps, steps_per_block=r.steps_per_block,
                         seconds=r.seconds, stopped_at_eos=r.finish_reason == "eos")
