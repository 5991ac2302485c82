"""Per-step events for streaming the denoising (terminal demo, server SSE, web page)."""

from __future__ import annotations

from dataclasses import dataclass, field

from unmask.decoding.result import GenerationResult
from unmask.decoding.sampling import TokenLogprob


@dataclass
class StepEvent:
    request_id: str
    step: int  # denoising steps taken so far for this request
    canvas: list[int]  # the request's generated region (or whole edited canvas), mask_id where still masked
    committed: int  # how many positions of `canvas` are no longer masked
    done: bool = False
    result: GenerationResult | None = None  # set on the final event
    changed: list[int] = field(default_factory=list)  # canvas indices committed/rewritten by this step
    # with options.logprobs: per canvas position, (log-probability, top alternatives) of its committed token
    logprobs: list[TokenLogprob | None] | None = None
