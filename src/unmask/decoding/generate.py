"""Text in, text out: tokenise, check the context, pick the decoder, cut at EOS / stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from unmask.decoding.ar import ARBatch, ARRow, ar_decode
from unmask.decoding.engine import Engine
from unmask.decoding.healing import Healing, heal
from unmask.decoding.events import StepEvent
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.result import GenerationResult
from unmask.model.config import ModelConfig
from unmask.model.transformer import Transformer
from unmask.tokenizer import Tokenizer


class TextModel(Protocol):
    """What decoding text needs: a model and its tokenizer (a Pipeline is one)."""
    model: Transformer
    tokenizer: Tokenizer

    @property
    def config(self) -> ModelConfig: ...

    def encode(self, text: str) -> list[int]: ...


PREFIX_BLOCKS = 256  # generate_many's store of finished prompt blocks (decoding/prefix.py)


def check_context(n_prompt: int, n_new: int, max_seq_len: int) -> None:
    if n_prompt + n_new > max_seq_len:
        raise OptionsError(
            f"prompt of {n_prompt} tokens + {n_new} new tokens exceeds the model context of {max_seq_len} tokens"
        )


def apply_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_checker(tokenizer, stop: list[str], skip: str = "") -> Callable[[list[int]], bool] | None:
    """The engine's `stop_when` for stop strings: does the decoded committed prefix (less a healed
    prompt's `skip` text at its start) contain one?"""
    if not stop:
        return None

    def stop_when(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        text = text[len(skip):] if text.startswith(skip) else text
        return any(s in text for s in stop)

    return stop_when


@dataclass
class Prepared:
    """A prompt ready to decode: its ids (healed: without the last token) and the healing to undo."""
    ids: list[int]
    healing: Healing | None

    @property
    def first_allowed(self) -> torch.Tensor | None:
        return self.healing.allowed if self.healing is not None else None


def _skip(p: Prepared) -> str:
    return p.healing.removed if p.healing is not None else ""


def prepare(pipe: TextModel, prompt: str | list[int], options: DecodeOptions) -> Prepared:
    """Tokenise, check the context, heal a text prompt (options.heal). The healed token is one of the
    max_new_tokens: same canvas, same block plan."""
    ids = pipe.encode(prompt) if isinstance(prompt, str) else list(prompt)
    c = pipe.config
    check_context(len(ids), options.max_new_tokens, c.max_seq_len)
    healing = heal(pipe.tokenizer, ids, c.vocab_size) if options.heal and isinstance(prompt, str) else None
    return Prepared(healing.prompt_ids if healing is not None else ids, healing)


def finish(pipe: TextModel, result: GenerationResult, prepared: Prepared, options: DecodeOptions) -> GenerationResult:
    """The answer's text: the healed prompt's token text taken off again, cut at the first stop string."""
    result.text = pipe.tokenizer.decode(result.tokens)
    healing = prepared.healing
    if healing is not None:
        result.prompt_tokens += 1  # the healed token is the prompt's, not the model's
        if result.text.startswith(healing.removed):
            result.text = result.text[len(healing.removed):]
    if options.stop:
        result.text, stopped = apply_stop(result.text, options.stop)
        if stopped:
            result.finish_reason = "stop"
    return result


def generate_text(pipe: TextModel, prompt: str | list[int], options: DecodeOptions,
                  on_step: Callable[[StepEvent], None] | None = None) -> GenerationResult:
    """Diffusion models decode with the engine (streaming StepEvents to `on_step`); causal twins with AR.
    A text prompt is token-healed (options.heal): its last token is re-decoded as the start of the answer,
    and that text is taken off the answer again, so `prompt + result.text` is what the model wrote."""
    p = prepare(pipe, prompt, options)
    stop_when = stop_checker(pipe.tokenizer, options.stop, skip=_skip(p))
    if not layout_for(pipe.config).diffusion:
        result = ar_decode(pipe.model, ARRow(p.ids, options, p.first_allowed, stop_when=stop_when), on_step)
    else:
        result = Engine(pipe.model, max_batch=1).generate(p.ids, options, on_step=on_step, stop_when=stop_when,
                                                          first_allowed=p.first_allowed)
    return finish(pipe, result, p, options)


def generate_many(pipe: TextModel, prompts: Sequence[str | list[int]], options: Sequence[DecodeOptions],
                  max_batch: int = 32) -> Iterator[tuple[int, GenerationResult]]:
    """generate_text for many prompts, `max_batch` decoded together, each with its own options; yields
    (index, result) as each finishes. Diffusion models share one engine queue; causal twins decode
    `max_batch` prompts at a time as one ARBatch."""
    if len(options) != len(prompts):
        raise OptionsError(f"{len(options)} options for {len(prompts)} prompts")
    if max_batch < 1:
        raise OptionsError(f"max_batch must be >= 1, got {max_batch}")
    prepared = [prepare(pipe, prompt, o) for prompt, o in zip(prompts, options)]
    if not prepared:
        return
    layout = layout_for(pipe.config)
    if not layout.diffusion:
        for start in range(0, len(prompts), max_batch):
            chunk = range(start, min(start + max_batch, len(prompts)))
            rows = [ARRow(prepared[i].ids, options[i], prepared[i].first_allowed,
                          stop_when=stop_checker(pipe.tokenizer, options[i].stop, _skip(prepared[i]))) for i in chunk]
            batch = ARBatch(pipe.model, rows)
            while not batch.done:
                batch.step()
            yield from ((i, finish(pipe, batch.result(b), prepared[i], options[i])) for b, i in enumerate(chunk))
        return
    # prompts sharing a beginning (few-shot examples, one file) reuse its finished blocks: exact, block_causal only
    reuse = PREFIX_BLOCKS if layout.prefix_reuse else 0
    engine = Engine(pipe.model, max_batch=max_batch, max_queue=len(prompts), prefix_blocks=reuse)
    index = {}
    for i, (p, o) in enumerate(zip(prepared, options)):
        rid = engine.submit(p.ids, o, stop_when=stop_checker(pipe.tokenizer, o.stop, skip=_skip(p)),
                            first_allowed=p.first_allowed)
        index[rid] = i
    while engine.has_work():
        for event in engine.step():
            if event.done:
                i = index[event.request_id]
                yield i, finish(pipe, event.result, prepared[i], options[i])
