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
    everywhere). The Transformer sets it from the input ids before running its layers.

    `rows`, when set, lists the flattened positions where the gate is on: eager CPU passes (one cheap host
    sync) then run the adapter on those rows only — none at all for a pass of committed tokens and drafts,
    which is most of the verify policy's steps."""

    value: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def adapter_delta(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                  gate: AdapterGate) -> torch.Tensor:
    """`out` (the base layer's output for `x`) plus the low-rank update where the gate is on."""
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if gate.rows is not None:
        if gate.rows.numel() == 0:
            return out
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        delta = F.linear(F.linear(flat_x.index_select(0, gate.rows), a), b) * scale
        return flat_out.index_add(0, gate.rows, delta.to(out.dtype)).view(out.shape)
    delta = F.linear(F.linear(x, a), b) * scale
    return out + (delta if gate.value is None else delta * gate.value.to(delta.dtype))


class AdaptedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, gate: AdapterGate):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)
        self.scale = alpha / rank
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adapter_delta(super().forward(x), x, self.lora_a, self.lora_b, self.scale, self.gate)


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
