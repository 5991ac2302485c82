"""Bits per byte of held-out text: the diffusion ELBO (an upper bound on NLL) or the AR twin's exact NLL.

The text is one token stream `[EOS] doc [EOS] doc ...` (the shard layout) cut into windows of `seq_len`
tokens starting at 1. Every model scores exactly the tokens of each window: a diffusion model sees the
window alone; a causal model also gets the one token before it as context, so the first token is scored
too. Bytes are the UTF-8 bytes the scored tokens stand for (EOS counts none), so models with different
tokenizers compare fairly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from unmask.data.shards import token_byte_lengths
from unmask.decoding.layout import layout_for
from unmask.diffusion.objective import sequence_nll
from unmask.model.transformer import Transformer
from unmask.tokenizer import Tokenizer


@dataclass
class ElboResult:
    nats: float  # summed NLL bound over the scored tokens
    tokens: int
    bytes: int
    exact: bool  # True for a causal model (exact NLL), False for a diffusion ELBO

    @property
    def nats_per_token(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * max(self.bytes, 1))

    def as_dict(self) -> dict:
        return {"bits_per_byte": self.bits_per_byte, "nats_per_token": self.nats_per_token,
                "tokens": self.tokens, "bytes": self.bytes, "exact": self.exact}


def token_stream(texts: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """The shard layout in memory: [EOS] doc [EOS] doc [EOS] ..."""
    out = [tokenizer.eos_id]
    for text in texts:
        out.extend(tokenizer.encode(text))
        out.append(tokenizer.eos_id)
    return np.asarray(out, dtype=np.int64)


def eval_window_len(model: Transformer, seq_len: int) -> int:
    """Longest window every attention mode can score within the model's context."""
    c, layout = model.config, layout_for(model.config)
    if not layout.diffusion:
        return min(seq_len, c.max_seq_len)  # the context token is input, the last token only a target
    if layout.block_causal:
        return min(seq_len, c.max_seq_len // 2)  # the ELBO feeds [x_t, x_0]
    return min(seq_len, c.max_seq_len)


def window_starts(n_tokens: int, seq_len: int, max_windows: int | None = None) -> list[int]:
    starts = list(range(1, n_tokens, seq_len))
    if max_windows is not None and len(starts) > max_windows:
        pick = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)  # spread over the whole set
        starts = [starts[i] for i in sorted(set(pick.tolist()))]
    return starts


@torch.no_grad()
def score_windows(model: Transformer, tokens: np.ndarray, starts: list[int], seq_len: int,
                  token_bytes: np.ndarray, n_samples: int = 8, batch_size: int = 16,
                  generator: torch.Generator | None = None, autocast: contextlib.AbstractContextManager | None = None,
                  device: torch.device | None = None) -> ElboResult:
    """Sum the NLL bound over the windows at `starts`. Full windows are batched; a short last window alone."""
    device = device or next(model.parameters()).device
    causal = not layout_for(model.config).diffusion
    ctx = 1 if causal else 0
    groups: dict[int, list[int]] = {}
    for s in starts:
        groups.setdefault(min(seq_len, len(tokens) - s), []).append(s)
    nats = 0.0
    n_tok = n_bytes = 0
    was_training = model.training
    model.eval()
    try:
        for length, group in sorted(groups.items()):
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                x = torch.from_numpy(np.stack([tokens[s - ctx : s + length] for s in chunk]).astype(np.int64)).to(device)
                with autocast or contextlib.nullcontext():
                    nll = sequence_nll(model, x, n_samples=n_samples, generator=generator)
                nats += float(nll.double().sum())
                scored = np.stack([tokens[s : s + length] for s in chunk])
                n_tok += scored.size
                n_bytes += int(token_bytes[scored].sum())
    finally:
        model.train(was_training)
    return ElboResult(nats, n_tok, n_bytes, exact=causal)


def evaluate_bits_per_byte(model: Transformer, tokenizer: Tokenizer, tokens: np.ndarray, seq_len: int = 512,
                           n_samples: int = 8, max_windows: int | None = None, batch_size: int = 16,
                           seed: int = 0, autocast=None) -> ElboResult:
    L = eval_window_len(model, seq_len)
    gen = torch.Generator().manual_seed(seed)
    byte_len = token_byte_lengths(tokenizer, model.config.vocab_size)
    return score_windows(model, tokens, window_starts(len(tokens), L, max_windows), L, byte_len,
                         n_samples=n_samples, batch_size=batch_size, generator=gen, autocast=autocast)
