"""The one front end between callers and decoders: the pipeline, the CLI and the server all prepare a
request and finish its result here, so a prompt means the same thing on every path.

`prepare` turns a prompt (text or token ids) and its options into a `Prepared`: the `DecodeRequest` a
decoder takes (decoding/contract.py), with the context checked once, the default length fitted to the room
the prompt leaves, the prompt token-healed (decoding/healing.py) and stop strings turned into the decoder's
`stop_when`. `finish` turns the decoder's result back into the answer: text cut at EOS and stop strings,
less the healed prompt's text; `Prepared.deltas` streams that text as it grows.

`max_new_tokens` (the server's `max_tokens`) is the client's count of new tokens, with healing as without:
a healed prompt's last token is re-decoded in the prompt's place, in addition to those new tokens (and
counted with the prompt), while the blocks widen to hold it so their number stays as asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unmask.decoding.contract import DecodeRequest, check_context
from unmask.decoding.detokenize import DeltaStream, final_text, stop_checker
from unmask.decoding.healing import Healing, heal
from unmask.decoding.options import DecodeOptions
from unmask.decoding.result import GenerationResult
from unmask.model.config import ModelConfig
from unmask.tokenizer import Tokenizer


@dataclass
class Prepared:
    """A request ready for a decoder, and what `finish` needs to turn its result into the answer."""

    request: DecodeRequest
    healing: Healing | None
    prompt_tokens: int  # the prompt (and suffix) as the caller gave it: a healed token counts here

    @property
    def options(self) -> DecodeOptions:
        return self.request.options

    @property
    def skip(self) -> str:
        """Text the decoded tokens start with that is the prompt's (a healed token's), not the answer's."""
        return self.healing.removed if self.healing is not None else ""

    def with_options(self, options: DecodeOptions) -> Prepared:
        """The same request under other options of the same length (a choice's own seed)."""
        return dataclasses.replace(self, request=dataclasses.replace(self.request, options=options))

    def deltas(self, tokenizer: Tokenizer, config: ModelConfig) -> DeltaStream:
        """The streaming detokenizer of this request's canvases (all at the end under self-correction,
        which may rewrite committed tokens)."""
        o = self.options
        return DeltaStream(tokenizer, config.mask_id, config.eos_id, o.stop, live=not o.self_correct, skip=self.skip)


def prepare(tokenizer: Tokenizer, config: ModelConfig, prompt: str | list[int], options: DecodeOptions,
            suffix_ids: list[int] | None = None, fit_length: bool = False, text: bool | None = None) -> Prepared:
    """Tokenise, fit and check the context, heal a text prompt (options.heal, not when infilling), and
    build the stop check. `fit_length`: max_new_tokens is a default, not the caller's, so shorten it to
    the room the prompt leaves (as vLLM does) instead of refusing the request. `text`: the prompt ids
    are a text's, to heal like one (default: whether `prompt` is a str)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = isinstance(prompt, str) if text is None else text
    suffix = list(suffix_ids or [])
    n_context, ctx = len(ids) + len(suffix), config.max_seq_len
    if fit_length and 0 < ctx - n_context < options.max_new_tokens:
        options = options.replace(max_new_tokens=ctx - n_context)
    check_context(len(ids), options.max_new_tokens, ctx, len(suffix))
    healing = heal(tokenizer, ids, config.vocab_size) if options.heal and text and not suffix else None
    if healing is not None:
        ids, options = healing.prompt_ids, _with_healed_token(options)
    stop_when = stop_checker(tokenizer, options.stop, healing.removed if healing is not None else "")
    request = DecodeRequest(ids, options, suffix, stop_when, healing.allowed if healing is not None else None)
    return Prepared(request, healing, n_context)


def _with_healed_token(options: DecodeOptions) -> DecodeOptions:
    """One token more for the re-decoded prompt token; the blocks widen to hold it, so their number (and a
    fixed step budget's split) stays as asked."""
    n = options.max_new_tokens
    blocks = -(-n // options.block_length)
    return options.replace(max_new_tokens=n + 1, block_length=-(-(n + 1) // blocks))


def finish(tokenizer: Tokenizer, config: ModelConfig, result: GenerationResult, prepared: Prepared) -> GenerationResult:
    """The answer, in `result` itself (the final StepEvent carries the same object): text cut at EOS and the
    first stop string (finish_reason "stop"), less the healed prompt's text; `tokens` are those that make
    the text (a healed token first), `completion_tokens` the new ones."""
    text, tokens, stopped = final_text(tokenizer, result.tokens, config.eos_id, prepared.options.stop, prepared.skip)
    result.text, result.tokens, result.prompt_tokens = text, tokens, prepared.prompt_tokens
    result.healed_tokens = 1 if prepared.healing is not None and tokens else 0
    if stopped:
        result.finish_reason = "stop"
    return result
