"""A toy policy the registry tests register for the length of one test."""

from __future__ import annotations

import torch

from unmask.decoding.params import Param
from unmask.decoding.policies import Policy, top_k_mask


class TopKPolicy(Policy):
    """A toy: the `top_k_commit` surest positions a step."""

    name = "topk"
    help = "the k surest positions every step"
    params = (Param("top_k_commit", 2, "positions committed a step", kind=int, ge=1, le=8),)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        return top_k_mask(conf, candidates, torch.tensor(self.options.param("top_k_commit")))
