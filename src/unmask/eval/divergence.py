"""How far a quantized (or lower-precision) copy of a model drifts from the original: the KL divergence of
their token distributions on held-out code, and how often their top tokens agree.

What is compared depends on what the model predicts from clean text:
  next-token  causal models, and adapted models with causal attention inside their blocks and shifted logits:
              one clean forward scores every position's next-token distribution (what greedy AR and the
              verify policy decode from)
  masked      other diffusion models: a seeded half of each window's positions is masked and the
              distributions at the masked positions are compared (what denoising decodes from)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.decoding.layout import layout_for
from unmask.model.transformer import Transformer

HELD_OUT_MODULES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "heapq.py", "bisect.py",
                    "shlex.py", "csv.py")  # CPython's own code: in no corpus recipe of ours


def held_out_code() -> list[str]:
    """The texts of HELD_OUT_MODULES from this interpreter's standard library."""
    import json

    root = Path(json.__file__).resolve().parents[1]
    return [(root / m).read_text(encoding="utf-8") for m in HELD_OUT_MODULES if (root / m).is_file()]


@dataclass
class Divergence:
    kl: float  # mean KL(reference || candidate) in nats per scored position
    top1_agreement: float  # fraction of scored positions where both models' most likely token is the same
    positions: int
    mode: str  # "next-token" or "masked"

    def as_dict(self) -> dict:
        return {"kl": self.kl, "top1_agreement": self.top1_agreement, "positions": self.positions, "mode": self.mode}


def predicts_next_token(model: Transformer) -> bool:
    return layout_for(model.config).next_token


@torch.inference_mode()
def divergence(reference: Transformer, candidate: Transformer, tokens: list[int], window: int = 256,
               max_windows: int = 16, seed: int = 0) -> Divergence:
    """Compare the two models on up to `max_windows` windows of `window` tokens of `tokens`."""
    if reference.config.vocab_size != candidate.config.vocab_size:
        raise ValueError("the two models have different vocabularies")
    next_token = predicts_next_token(reference)
    window = min(window, reference.config.max_seq_len, candidate.config.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    kl_sum, agree, count = 0.0, 0, 0
    for start in range(0, max(len(tokens) - 1, 0), window)[:max_windows]:
        ids = torch.tensor(tokens[start : start + window])[None]
        if ids.shape[1] < 2:
            break
        if next_token:
            scored = torch.ones_like(ids, dtype=torch.bool)
            scored[:, 0] = False  # shifted logits: position 0 has no token before it
        else:
            scored = torch.rand(ids.shape, generator=gen) < 0.5
            ids = torch.where(scored, torch.full_like(ids, reference.config.mask_id), ids)
        ref = _log_probs(reference, ids)[scored[0]]
        cand = _log_probs(candidate, ids)[scored[0]]
        kl_sum += (ref.exp() * (ref - cand)).sum(-1).clamp_min(0).sum().item()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        count += ref.shape[0]
    if count == 0:
        raise ValueError("no text to score")
    return Divergence(kl_sum / count, agree / count, count, "next-token" if next_token else "masked")


def _log_probs(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    device = model.device
    logits = model(ids.to(device))[0].float()
    logits[:, model.config.mask_id] = -1e9  # neither model may propose the mask token (finite: no 0 * inf)
    return logits.log_softmax(-1).cpu()
