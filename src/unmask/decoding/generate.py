"""Text in, text out: tokenise, check the context, pick the decoder, cut at EOS / stop strings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unmask.decoding.ar import ar_generate
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.reference import reference_result
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


def generate_text(pipe: "Pipeline", prompt: str | list[int], options: DecodeOptions,
                  on_step: Callable | None = None) -> GenerationResult:
    ids = pipe.encode(prompt) if isinstance(prompt, str) else list(prompt)
    c = pipe.config
    check_context(len(ids), options.max_new_tokens, c.max_seq_len)
    if c.attention == "causal":
        result = ar_generate(pipe.model, ids, options.max_new_tokens, options.temperature, options.top_k,
                             options.top_p, options.seed)
    else:
        # round the canvas up to whole blocks; the result is cut at EOS / max_new_tokens afterwards
        block = min(options.block_length, options.max_new_tokens)
        gen_length = -(-options.max_new_tokens // block) * block
        n_blocks = gen_length // block
        steps = options.steps or gen_length
        steps = max(n_blocks, steps - steps % n_blocks)
        result = reference_result(pipe.model, ids, gen_length=gen_length, block_length=block, steps=steps,
                                  temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                                  seed=options.seed)
        result.tokens = result.tokens[: options.max_new_tokens]
    result.text = pipe.tokenizer.decode(result.tokens)
    if options.stop:
        result.text, stopped = apply_stop(result.text, options.stop)
        if stopped:
            result.finish_reason = "stop"
    return result
