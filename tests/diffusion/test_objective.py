"""Objectives: the SFT loss sees only answer positions; block-diffusion logits never leak the clean target."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model
from train_helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from unmask.diffusion.objective import denoiser_logits, sft_loss
from unmask.model.config import ModelConfig


class TableModel(nn.Module):
    """Logits are a free parameter per position: d loss / d logits shows which positions the loss uses."""

    def __init__(self, config: ModelConfig, length: int):
        super().__init__()
        self.config = config
        self.table = nn.Parameter(torch.zeros(length, config.vocab_size))

    def forward(self, x, **_):
        return self.table[None].expand(x.shape[0], -1, -1)


def test_sft_loss_counts_answer_positions_only():
    config = ModelConfig(vocab_size=32, dim=8, n_layers=1, n_heads=2, mask_id=3, eos_id=1, pad_id=1)
    model = TableModel(config, 12)
    x0 = torch.randint(4, 32, (4, 12))
    x0[:, 9:] = config.eos_id  # answer + EOS padding
    prompt_len = torch.tensor([5, 5, 5, 5])
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(())
    for _ in range(8):  # many draws of t so every answer position gets masked at least once
        total = total + sft_loss(model, x0, prompt_len, generator=gen)
    total.backward()
    grad = model.table.grad.abs().sum(-1)
    assert torch.all(grad[:5] == 0)  # prompt: never masked, never in the loss
    assert torch.all(grad[5:] > 0)  # answer and the EOS padding after it: trained on


@pytest.mark.parametrize("logits_shift", [False, True])
def test_block_diffusion_logits_do_not_see_the_clean_target(tokenizer, logits_shift):
    model = tiny_model(tokenizer, attention="block_causal", block_size=4, logits_shift=logits_shift)
    L = 12
    x0 = torch.randint(10, 500, (1, L))
    x_t = torch.full_like(x0, tokenizer.mask_id)
    with torch.no_grad():
        base = denoiser_logits(model, x_t, x0)
        for i in range(L):
            changed = x0.clone()
            changed[:, i:] = (x0[:, i:] + 1) % 500  # the clean tokens at i and after
            other = denoiser_logits(model, x_t, changed)
            # prediction of position i may use clean tokens of earlier blocks only
            assert torch.allclose(base[:, i], other[:, i], atol=1e-5), i
    if logits_shift:
        # a block's first token is read from the clean previous token: changing it changes the prediction
        changed = x0.clone()
        changed[:, 3] += 1
        with torch.no_grad():
            assert not torch.allclose(base[:, 4], denoiser_logits(model, x_t, changed)[:, 4], atol=1e-4)
