"""Text in, text out, for the pipeline and the CLI: the front end prepares each prompt (decoding/frontend.py),
the model's decoder decodes it, the front end finishes the answer."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

from unmask.decoding.ar import ARBatch, ARRow, ar_decode
from unmask.decoding.engine import Engine
from unmask.decoding.events import StepEvent
from unmask.decoding.frontend import Prepared, finish, prepare
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


PREFIX_BLOCKS = 256  # generate_many's store of finished prompt blocks (decoding/prefix.py)


def _ar_row(p: Prepared) -> ARRow:
    r = p.request
    return ARRow(r.prompt_ids, r.options, r.first_allowed, stop_when=r.stop_when)


def generate_text(pipe: TextModel, prompt: str | list[int], options: DecodeOptions,
                  on_step: Callable[[StepEvent], None] | None = None) -> GenerationResult:
    """Diffusion models decode with the engine (streaming StepEvents to `on_step`); causal twins with AR.
    A text prompt is token-healed (options.heal): its last token is re-decoded as the start of the answer,
    and that text is taken off the answer again, so `prompt + result.text` is what the model wrote."""
    p = prepare(pipe.tokenizer, pipe.config, prompt, options)
    if not layout_for(pipe.config).diffusion:
        result = ar_decode(pipe.model, _ar_row(p), on_step)
    else:
        engine = Engine(pipe.model, max_batch=1)
        rid = engine.submit(p.request)
        result = None
        for event in engine.run(rid):
            if on_step is not None:
                on_step(event)
            result = event.result
    return finish(pipe.tokenizer, pipe.config, result, p)


def generate_many(pipe: TextModel, prompts: Sequence[str | list[int]], options: Sequence[DecodeOptions],
                  max_batch: int = 32) -> Iterator[tuple[int, GenerationResult]]:
    """generate_text for many prompts, `max_batch` decoded together, each with its own options; yields
    (index, result) as each finishes. Diffusion models share one engine queue; causal twins decode
    `max_batch` prompts at a time as one ARBatch."""
    if len(options) != len(prompts):
        raise OptionsError(f"{len(options)} options for {len(prompts)} prompts")
    if max_batch < 1:
        raise OptionsError(f"max_batch must be >= 1, got {max_batch}")
    prepared = [prepare(pipe.tokenizer, pipe.config, prompt, o) for prompt, o in zip(prompts, options)]
    if not prepared:
        return
    layout = layout_for(pipe.config)
    done = lambda i, result: (i, finish(pipe.tokenizer, pipe.config, result, prepared[i]))  # noqa: E731
    if not layout.diffusion:
        for start in range(0, len(prompts), max_batch):
            chunk = range(start, min(start + max_batch, len(prompts)))
            batch = ARBatch(pipe.model, [_ar_row(prepared[i]) for i in chunk])
            while not batch.done:
                batch.step()
            yield from (done(i, batch.result(b)) for b, i in enumerate(chunk))
        return
    # prompts sharing a beginning (few-shot examples, one file) reuse its finished blocks: exact, block_causal only
    reuse = PREFIX_BLOCKS if layout.prefix_reuse else 0
    engine = Engine(pipe.model, max_batch=max_batch, max_queue=len(prompts), prefix_blocks=reuse)
    index = {engine.submit(p.request): i for i, p in enumerate(prepared)}
    while engine.has_work():
        for event in engine.step():
            if event.done:
                yield done(index[event.request_id], event.result)
