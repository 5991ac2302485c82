"""Text in, text out: tokenise, check the context, pick the decoder, cut at EOS / stop strings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from unmask.decoding.ar import ar_generate, ar_generate_batch
from unmask.decoding.engine import Engine
from unmask.decoding.healing import heal
from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.result import GenerationResult

if TYPE_CHECKING:
    from unmask.pipeline import Pipeline


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


def generate_text(pipe: "Pipeline", prompt: str | list[int], options: DecodeOptions,
                  on_step: Callable[[StepEvent], None] | None = None) -> GenerationResult:
    """Diffusion models decode with the engine (streaming StepEvents to `on_step`); causal twins with AR.
    A text prompt is token-healed (options.heal): its last token is re-decoded as the start of the answer,
    and that text is taken off the answer again, so `prompt + result.text` is what the model wrote."""
    ids = pipe.encode(prompt) if isinstance(prompt, str) else list(prompt)
    c = pipe.config
    check_context(len(ids), options.max_new_tokens, c.max_seq_len)
    healing = heal(pipe.tokenizer, ids, c.vocab_size) if options.heal and isinstance(prompt, str) else None
    first_allowed = None
    if healing is not None:  # the healed token is one of the max_new_tokens: same canvas, same block plan
        ids, first_allowed = healing.prompt_ids, healing.allowed
    if c.attention == "causal":
        result = ar_generate(pipe.model, ids, options.max_new_tokens, options.temperature, options.top_k,
                             options.top_p, options.seed, on_step=on_step, first_allowed=first_allowed,
                             presence_penalty=options.presence_penalty, frequency_penalty=options.frequency_penalty)
    else:
        stop_when = stop_checker(pipe.tokenizer, options.stop, skip=healing.removed if healing else "")
        result = Engine(pipe.model, max_batch=1).generate(ids, options, on_step=on_step, stop_when=stop_when,
                                                          first_allowed=first_allowed)
    result.text = pipe.tokenizer.decode(result.tokens)
    if healing is not None:
        result.prompt_tokens += 1  # the healed token is the prompt's, not the model's
        if result.text.startswith(healing.removed):
            result.text = result.text[len(healing.removed):]
    if options.stop:
        result.text, stopped = apply_stop(result.text, options.stop)
        if stopped:
            result.finish_reason = "stop"
    return result


def generate_many(pipe: "Pipeline", prompts: list[list[int]], options: list[DecodeOptions],
                  max_batch: int = 32) -> Iterator[tuple[int, GenerationResult]]:
    """Token-id prompts (no healing), `max_batch` decoded together; yields (index, result) as each finishes,
    with its text cut at its stop strings. Diffusion models share one engine queue, each request with its own
    options; causal twins decode `max_batch` prompts at a time with ar_generate_batch, so their options may
    differ only in max_new_tokens, seed (a chunk samples from its first seed) and stop strings."""
    if len(options) != len(prompts):
        raise OptionsError(f"{len(options)} options for {len(prompts)} prompts")
    for ids, o in zip(prompts, options):
        check_context(len(ids), o.max_new_tokens, pipe.config.max_seq_len)

    def finish(i: int, result: GenerationResult) -> tuple[int, GenerationResult]:
        result.text = pipe.tokenizer.decode(result.tokens)
        if options[i].stop:
            result.text, stopped = apply_stop(result.text, options[i].stop)
            result.finish_reason = "stop" if stopped else result.finish_reason
        return i, result

    if pipe.config.attention == "causal":
        sampling = [o.replace(max_new_tokens=1, seed=None, stop=[]) for o in options]
        if any(x != sampling[0] for x in sampling):
            raise OptionsError("batched AR decoding needs the same sampling options for every prompt")
        o = options[0]
        for start in range(0, len(prompts), max_batch):
            chunk = range(start, min(start + max_batch, len(prompts)))
            results = ar_generate_batch(pipe.model, [prompts[i] for i in chunk],
                                        [options[i].max_new_tokens for i in chunk], o.temperature, o.top_k, o.top_p,
                                        options[start].seed, presence_penalty=o.presence_penalty,
                                        frequency_penalty=o.frequency_penalty)
            yield from (finish(i, r) for i, r in zip(chunk, results))
        return
    engine = Engine(pipe.model, max_batch=max_batch, max_queue=len(prompts))
    index = {engine.submit(ids, o): i for i, (ids, o) in enumerate(zip(prompts, options))}
    while engine.has_work():
        for event in engine.step():
            if event.done:
                yield finish(index[event.request_id], event.result)
