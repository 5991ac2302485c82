"""Low-rank adapters that act only where the input is [MASK].

An AR model adapted to block diffusion must learn one new thing: what the tokens *after* the next one are,
given placeholders for them. With `adapter_tokens="masks"` the adapter's low-rank update is added only at
[MASK] inputs, so every committed token is computed exactly as the base model computes it: its K/V are the
base model's, and with causal attention inside a block and shifted logits, the leftmost mask of a block —
read from the committed token before it — is predicted exactly as the AR base predicts the next token.
The adapter can only add look-ahead; it cannot make the base model worse.

peft's LoRA adds its update to every token and offers no per-token gate, which is the point here, so the
adapter is this small module: an nn.Linear (same `weight`/`bias` names, so base checkpoints load unchanged)
plus `lora_a` [rank, in] and `lora_b` [out, rank], B initialised to zero so training starts at the base.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdapterGate:
    """The per-token gate [B, T, 1] of the current forward pass, shared by every adapted layer (None = on
    everywhere). The Transformer sets it from the input ids before running its layers."""

    value: torch.Tensor | None = None


class AdaptedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, gate: AdapterGate):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)
        self.scale = alpha / rank
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        delta = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scale
        gate = self.gate.value
        return out + (delta if gate is None else delta * gate.to(delta.dtype))


ADAPTED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention projections and dense SwiGLU layers


def adapt_linears(module: nn.Module, rank: int, alpha: float, gate: AdapterGate) -> None:
    """Swap the adapted nn.Linear children of `module` (recursively, experts of MoE layers excepted) for
    AdaptedLinear sharing their weight and bias."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and name in ADAPTED and not isinstance(child, AdaptedLinear):
            new = AdaptedLinear(child.in_features, child.out_features, child.bias is not None, rank, alpha, gate)
            new.to(device=child.weight.device)
            new.weight = child.weight
            if child.bias is not None:
                new.bias = child.bias
            setattr(module, name, new)
        elif name != "experts":
            adapt_linears(child, rank, alpha, gate)


def is_adapter_param(name: str) -> bool:
    """Parameters an adapter adds to its base model (what an adapter folder stores)."""
    return name.endswith(("lora_a", "lora_b")) or name == "mask_embedding"
