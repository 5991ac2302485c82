"""Test models for the decoding engine: a context-sensitive random model and a scripted mock."""

from __future__ import annotations

import torch
import torch.nn as nn

from conftest import tiny_config, tiny_model
from unmask.model.transformer import KVCache


def sharp_model(tokenizer, seed: int = 0, **overrides):
    """A random tiny model whose output depends strongly on context, so cache approximations and batching bugs
    show up as different tokens."""
    return sharpen(tiny_model(tokenizer, seed=seed, **overrides))


def sharpen(model):
    """Sharper attention, larger residual branches, a peaked softmax: a random model whose tokens depend on
    context instead of repeating what the (mask) embedding alone predicts."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(4)
            layer.attention.wk.weight.mul_(4)
            layer.attention.wo.weight.mul_(30)
            for name, p in layer.feed_forward.named_parameters():  # a dense w2, or every expert's
                if name.endswith("w2.weight"):
                    p.mul_(30)
        model.output.weight.mul_(20)
    return model


class ScriptedModel(nn.Module):
    """Fixed logits from a rule, like nanochat's mock: `rule(position, current_token) -> (token, prob)`;
    the rest of the probability mass is spread evenly. Hidden states *are* the logits (identity head)."""

    def __init__(self, tokenizer, rule):
        super().__init__()
        self.config = tiny_config(tokenizer)
        self.rule = rule
        V = self.config.vocab_size
        self.output = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.output.weight.copy_(torch.eye(V))
        self.calls = 0

    def new_cache(self, batch, max_len, dtype=None):
        return KVCache(self.config, batch, max_len)  # never written: the mock has no K/V

    def forward(self, input_ids, positions=None, cache=None, return_hidden=False, **_):
        self.calls += 1
        B, T = input_ids.shape
        V = self.config.vocab_size
        if positions is None:
            positions = torch.arange(T).expand(B, -1)
        out = torch.empty(B, T, V)
        for b in range(B):
            for t in range(T):
                token, prob = self.rule(int(positions[b, t]), int(input_ids[b, t]))
                row = torch.full((V,), (1 - prob) / (V - 1))
                row[token] = prob
                out[b, t] = row.log()
        return out if return_hidden else self.output(out)
