"""`POST /v1/edits`: Instant Edit requests turned into jobs for the worker thread, and results into JSON.

The body follows OpenAI's retired edits endpoint (`input`, `instruction` -> `choices[0].text`) and adds
our modes: `spans` (rewrite [start, end) character ranges, or <<< >>> markers in the text), `auto`
(re-mask improbable tokens and denoise, in rounds) and `instruction` (SDEdit-style re-noising).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions
from unmask.edit.editor import EditResult, edit_text, resolve_regions
from unmask.edit.spans import EditError
from unmask.serve.schema import ApiError, EditRequest, ServerLimits


def check_edit(req: EditRequest, mode: str, limits: ServerLimits) -> None:
    """Fail fast (a 400 naming the field, as every error names its field) instead of after the job was
    queued: `n` other than 1 (an edit has one result), bad spans, or more spans than the server's limit
    (the spans' masks are decoded block after block, so their number bounds the edit's time)."""
    if req.n != 1:
        raise ApiError(f"n: an edit returns one choice; n must be 1, got {req.n}", 400, "n")
    try:
        _, regions = resolve_regions(req.input, req.spans, None, markers=True, required=mode == "spans")
    except EditError as e:
        raise ApiError(f"spans: {e}", 400, "spans") from None
    if len(regions) > limits.max_spans:
        raise ApiError(f"spans: {len(regions)} spans is more than this server's limit of {limits.max_spans} per edit",
                       400, "spans")


class WorkerPipeline:
    """The pipeline as an edit job sees it: `model` is the job's (serve/jobs.py WorkerModel), so a forward
    pass the edit makes itself (a left-to-right model's suffix scoring) runs on the worker thread too, never
    beside an engine step: the model is not thread-safe (its adapter's gate is per-call module state)."""

    def __init__(self, pipeline: Any, model: Any):
        self._pipeline, self.model = pipeline, model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


def edit_job(pipeline: Any, req: EditRequest, mode: str, options: DecodeOptions) -> Callable:
    kwargs: dict[str, Any] = {"mode": mode, "spans": req.spans, "instruction": req.instruction, "options": options}
    for ours, theirs in (("strength", "strength"), ("remask_below", "flag_below"), ("max_rounds", "max_rounds"),
                         ("length", "length")):
        value = getattr(req, theirs)
        if value is not None:
            kwargs[ours] = value

    def job(on_step: Callable[[StepEvent], None], denoiser: Any) -> EditResult:
        # the edit's own final event (done=True, no canvas) is replaced by the job's return value; its
        # canvases are requests of the server's engine (the job is its denoiser, serve/jobs.py)
        return edit_text(WorkerPipeline(pipeline, denoiser.model), req.input,
                         on_step=lambda ev: None if ev.done else on_step(ev), denoiser=denoiser, **kwargs)

    return job


def edit_response_fields(tokenizer: Any, result: EditResult, t0: float) -> tuple[str, dict, dict]:
    """(edited text, extra choice fields, usage) for a finished edit."""
    fields = {"mode": result.mode, "spans": [list(s) for s in result.spans], "replacements": result.replacements,
              "changed": result.changed, "rounds": result.rounds}
    n_prompt = len(tokenizer.encode(result.original))
    n_new = sum(len(tokenizer.encode(r)) for r in result.replacements)
    seconds = result.seconds or (time.perf_counter() - t0)
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new,
             "nfe": result.nfe, "steps": result.steps, "tokens_per_step": round(n_new / max(result.steps, 1), 4),
             "seconds": round(seconds, 6)}
    return result.text, fields, usage
