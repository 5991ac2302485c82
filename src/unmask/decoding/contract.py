"""What a decoder is asked and what it promises: the typed contract between the front end (or the server's
worker) and the two decoders, the diffusion `Engine` and the causal `ARQueue`.

A `DecodeRequest` is a prompt to continue (with a suffix: to infill before); a `CanvasRequest` is a whole
canvas whose masks are filled in place (edits; diffusion models only). A `Decoder` takes either with
`submit`, advances every request it holds by one step per `step()` (one `StepEvent` each), drops one with
`cancel`, and says how full it is with `capacity`. The checks every decoder makes on a new request are
here, once: the waiting queue, the token ids, the context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from unmask.decoding.events import StepEvent
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.errors import UnmaskError
from unmask.model.config import ModelConfig


class QueueFull(UnmaskError):
    """A decoder's waiting queue is at max_queue (the server answers 429)."""


class ContextError(OptionsError):
    """A request that does not fit the model context. `param`: what the client should shorten — "prompt"
    (no room for a single new token) or "max_tokens" (the new tokens asked for are too many); the server
    puts the name of the field it came from before the message."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class DecodeRequest:
    """Continue `prompt_ids` by `options.max_new_tokens` new tokens (before `suffix_ids`: infilling).
    `stop_when(answer_ids)` True ends the request there (stop strings); `first_allowed` (bool [vocab])
    restricts the first new token (token healing, decoding/healing.py)."""

    prompt_ids: list[int]
    options: DecodeOptions
    suffix_ids: list[int] = field(default_factory=list)
    stop_when: Callable[[list[int]], bool] | None = None
    first_allowed: torch.Tensor | None = None
    request_id: str | None = None

    @property
    def length(self) -> int:
        """Tokens of the canvas: prompt, new tokens, suffix."""
        return len(self.prompt_ids) + self.options.max_new_tokens + len(self.suffix_ids)


@dataclass
class CanvasRequest:
    """Fill every mask of `canvas` in place (an edit's canvas); `banned` token ids are never written."""

    canvas: list[int]
    options: DecodeOptions
    banned: set[int] = field(default_factory=set)
    request_id: str | None = None

    @property
    def length(self) -> int:
        return len(self.canvas)


@dataclass(frozen=True)
class Capacity:
    """How full a decoder is: `rows` decoded together, `active` of them in use, `waiting` queued."""

    rows: int
    active: int
    waiting: int

    @property
    def free(self) -> int:
        """Requests the decoder can take before one has to wait for a row."""
        return self.rows - self.active - self.waiting


@runtime_checkable
class Decoder(Protocol):
    """A request queue that decodes a model: the diffusion Engine or the causal ARQueue (decoding/queues.py
    picks one). Used from one thread."""

    model: torch.nn.Module
    max_batch: int
    max_queue: int

    def submit(self, request: DecodeRequest | CanvasRequest) -> str: ...

    def step(self) -> list[StepEvent]: ...

    def cancel(self, request_id: str) -> None: ...

    @property
    def capacity(self) -> Capacity: ...

    def has_work(self) -> bool: ...


def as_request(request: DecodeRequest | CanvasRequest | Sequence[int], options: DecodeOptions | None,
               request_id: str | None, **fields) -> DecodeRequest | CanvasRequest:
    """`submit`'s request: a typed one as it is, or the keyword form `submit(prompt_ids, options, ...)`."""
    if isinstance(request, (DecodeRequest, CanvasRequest)):
        if options is not None or fields:
            raise TypeError("submit takes a typed request alone, or prompt ids with their options")
        if request_id is not None:
            request.request_id = request_id
        return request
    if options is None:
        raise TypeError("submit(prompt_ids, options): the options are missing")
    suffix = fields.pop("suffix_ids", None)
    return DecodeRequest(list(request), options, list(suffix or []), request_id=request_id, **fields)


def check_context(n_prompt: int, n_new: int, max_seq_len: int, n_suffix: int = 0) -> None:
    """The one context check: prompt (+ suffix) and the new tokens must fit the model context."""
    n_context = n_prompt + n_suffix
    if n_context >= max_seq_len and n_new > 0:
        raise ContextError(f"{n_context} tokens leave no room in the model context of {max_seq_len} tokens", "prompt")
    if n_context + n_new > max_seq_len:
        raise ContextError(f"prompt of {n_context} tokens + {n_new} new tokens exceeds the model context of "
                           f"{max_seq_len} tokens", "max_tokens")


def check_submit(request: DecodeRequest | CanvasRequest, config: ModelConfig, waiting: Sequence[str],
                 active: Sequence[str], max_queue: int) -> None:
    """What every decoder checks on `submit`: room in its queue, token ids in the vocabulary and not the
    mask (outside an edit's canvas), the context, a request id not in use."""
    if len(waiting) >= max_queue:
        raise QueueFull(f"queue full: {len(waiting)} requests waiting (max_queue {max_queue})")
    if request.length == 0:
        raise OptionsError("empty canvas: nothing to decode")
    if isinstance(request, CanvasRequest):
        ids = request.canvas
        if len(ids) > config.max_seq_len:
            raise ContextError(f"canvas of {len(ids)} tokens exceeds the model context of {config.max_seq_len} tokens",
                               "max_tokens")
    else:
        ids = request.prompt_ids + request.suffix_ids
        if layout_for(config).diffusion and config.mask_id in ids:  # a causal model reads it as any token
            raise OptionsError("prompt and suffix must not contain the mask token")
        check_context(len(request.prompt_ids), request.options.max_new_tokens, config.max_seq_len,
                      len(request.suffix_ids))
    if ids and (min(ids) < 0 or max(ids) >= config.vocab_size):
        raise OptionsError(f"token ids must be in [0, {config.vocab_size})")
    if request.request_id is not None and (request.request_id in waiting or request.request_id in active):
        raise OptionsError(f"request id {request.request_id!r} is already in use")
