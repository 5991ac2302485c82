"""Text in, text out: tokenise, check the context, pick the decoder, cut at EOS / stop strings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unmask.decoding.ar import ar_generate
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
