"""Token healing: a prompt that ends mid-token gets continued the way training text was.

BPE merges a newline with the indentation after it ("\\n    " is one token), so a prompt ending in "\\n"
ends with a token that, in training, was almost never followed by an indented line: the model "learns"
that a bare "\\n" token is followed by column-0 text and leaves the function it was asked to write.
Healing drops the prompt's last token and makes the first new token start with that token's text
(any of "\\n", "\\n    ", "\\n        ", ...); the caller then removes that text from the answer. The
re-decoded token stands in the prompt token's place: the front end (decoding/frontend.py) adds it to the
new tokens asked for and counts it with the prompt, so the canvas keeps its length.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

REPLACEMENT = "\ufffd"


@dataclass
class Healing:
    prompt_ids: list[int]  # the prompt without its last token
    removed: str  # that token's text: the answer's first token starts with it
    allowed: torch.Tensor  # bool [vocab]: tokens that may come first


def heal(tokenizer, prompt_ids: list[int], vocab_size: int | None = None) -> Healing | None:
    """The healed prompt, or None when there is nothing to heal (special or partial-character last token,
    no longer token that extends it, or a one-token prompt). `vocab_size`: the model's (often padded)."""
    if len(prompt_ids) < 2:
        return None
    last = prompt_ids[-1]
    strings, ids, rank = _sorted_vocab(tokenizer)
    if last not in rank:  # special token
        return None
    # sorted strings put every extension of s right after s
    k = rank[last]
    end = bisect.bisect_left(strings, strings[k] + "\U0010ffff", lo=k + 1)
    removed = tokenizer.decode([last])
    if end == k + 1 or REPLACEMENT in removed:
        return None
    allowed = torch.zeros(max(vocab_size or 0, tokenizer.vocab_size), dtype=torch.bool)
    allowed[ids[k:end]] = True
    return Healing(prompt_ids[:-1], removed, allowed)


def _sorted_vocab(tokenizer) -> tuple[list[str], list[int], dict[int, int]]:
    """(token strings sorted, their ids, id -> rank) without special tokens; built once per tokenizer.
    Token strings are byte-level, so string prefixes are byte prefixes."""
    cached = getattr(tokenizer, "_healing_vocab", None)
    if cached is None:
        special = set(tokenizer.special.values()) | {tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id}
        pairs = sorted((s, i) for s, i in tokenizer.hf.get_vocab(with_added_tokens=False).items() if i not in special)
        strings, ids = [s for s, _ in pairs], [i for _, i in pairs]
        cached = (strings, ids, {i: k for k, i in enumerate(ids)})
        tokenizer._healing_vocab = cached
    return cached
