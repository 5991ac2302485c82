"""Multi-turn chat on any checkpoint: messages -> the checkpoint's chat template -> generate -> cut at the end of
the turn. Used by `unmask chat`; the server can use it too.

Instruct checkpoints end a turn with their own token (LLaDA `<|eot_id|>`, Qwen/Dream `<|im_end|>`), which is
often not the EOS the model pads with, so a reply is cut at whichever end-of-turn token comes first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from unmask.decoding.options import DecodeOptions
from unmask.decoding.result import GenerationResult

if TYPE_CHECKING:
    from unmask.pipeline import Pipeline

log = logging.getLogger(__name__)

# end-of-turn tokens of the common templates (only those in the vocabulary are used)
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<|end_of_turn|>", "<end_of_turn>", "</s>")


def end_of_turn_strings(pipe: "Pipeline") -> list[str]:
    """Token texts that end an assistant turn: EOS, generation_config.json's eos_token_id(s), known names."""
    tok = pipe.tokenizer
    ids = [tok.eos_id]
    gen_cfg = pipe.path / "generation_config.json" if pipe.path is not None else None
    if gen_cfg is not None and gen_cfg.exists():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        except (json.JSONDecodeError, AttributeError) as e:
            log.warning("ignoring unreadable %s: %s", gen_cfg, e)
    texts = [tok.id_to_token(int(i)) for i in ids if i is not None]
    texts += [t for t in END_OF_TURN if tok.token_to_id(t) is not None]
    return list(dict.fromkeys(t for t in texts if t))  # ordered, unique


@dataclass
class ChatTurn:
    reply: str
    prompt: str  # the formatted prompt the model saw
    result: GenerationResult


class ChatSession:
    """Holds the conversation; `send(text)` formats it with the template, generates and records the reply."""

    def __init__(self, pipe: "Pipeline", options: DecodeOptions | None = None, system: str | None = None,
                 template_variables: dict[str, Any] | None = None):
        self.pipe = pipe
        self.template_variables = template_variables or {}  # e.g. Qwen3's enable_thinking
        self.options = options or DecodeOptions(max_new_tokens=256)
        self.system = system
        self.stops = end_of_turn_strings(pipe)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> str:
        return self.pipe.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True,
                                                       **self.template_variables)

    def send(self, text: str, on_step: Callable | None = None) -> ChatTurn:
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.prompt()
            options = self.options.replace(stop=list(self.options.stop) + self.stops)
            result = self.pipe.generate(prompt, options, on_step=on_step)
        except Exception:
            self.messages.pop()  # a failed turn (e.g. the context is full) leaves the history as it was
            raise
        reply = result.text.strip()
        self.messages.append({"role": "assistant", "content": reply})
        return ChatTurn(reply=reply, prompt=prompt, result=result)
