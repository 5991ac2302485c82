"""Token choice: greedy, temperature (frequencies follow softmax(l / T)), top-k, exact nucleus, seeding."""

import pytest
import torch

from unmask.decoding import sampling
from unmask.decoding.sampling import filter_logits, nucleus, penalize, sample_tokens


def sorted_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The textbook definition, with a full sort: what `nucleus` must equal."""
    probs = logits.double().softmax(-1)
    p, order = probs.sort(-1, descending=True)
    keep = (p.cumsum(-1) - p) < top_p
    return torch.zeros_like(keep).scatter(-1, order, keep)


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0, 40.0])  # flat (nucleus beyond the first K) to peaked
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("rows,vocab", [(6, 300), (33, 4096)])
def test_nucleus_equals_the_sorted_definition(scale, top_p, rows, vocab, monkeypatch):
    monkeypatch.setattr(sampling, "NUCLEUS_FIRST_K", 4)  # force the bucket path on a small vocabulary
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * scale
    logits[0] = logits[0] * 0.01 + torch.arange(vocab) * 1e-3  # one nearly uniform row beside peaked ones
    got = nucleus(logits, top_p)
    assert torch.equal(got, sorted_nucleus(logits, top_p))
    kept_mass = (logits.softmax(-1) * got).sum(-1)
    assert (kept_mass >= top_p - 1e-6).all()


def test_greedy_is_argmax_and_reports_its_probability():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    tokens, p = sample_tokens(logits)
    assert tokens.tolist() == [1, 0]
    assert p.dtype == torch.float64 and torch.allclose(p, logits.double().softmax(-1).max(-1).values)


def test_temperature_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    T = 0.7
    draws = 20000
    tokens, _ = sample_tokens(logits.expand(draws, -1), temperature=T, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(tokens, minlength=4).double() / draws
    want = (logits.double() / T).softmax(-1)
    assert torch.allclose(freq, want, atol=0.015), (freq, want)


def test_top_k_and_top_p_never_sample_outside():
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0, -2.0]).expand(5000, -1)
    gen = torch.Generator().manual_seed(2)
    tokens, _ = sample_tokens(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(tokens.tolist()) == {0, 1}
    # p = 0.595, 0.361, 0.030, ...: top-p 0.9 keeps two tokens, top-p 0.5 only the first
    tokens, _ = sample_tokens(logits, temperature=1.0, top_p=0.9, generator=gen)
    assert set(tokens.tolist()) == {0, 1}
    tokens, _ = sample_tokens(logits, temperature=1.0, top_p=0.5, generator=gen)
    assert set(tokens.tolist()) == {0}
    assert filter_logits(logits[:1], top_p=0.9).isfinite().sum() == 2


def test_temperature_comes_before_top_p_and_the_confidence():
    # p at T=1: 0.595, 0.361, ... -> top-p 0.8 keeps two tokens; at T=0.25 the first alone holds 0.88
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0, -2.0])
    assert logits.softmax(-1)[0] < 0.8 <= (logits / 0.25).softmax(-1)[0]
    gen = torch.Generator().manual_seed(4)
    tokens, _ = sample_tokens(logits.expand(4000, -1), temperature=0.25, top_p=0.8, generator=gen)
    assert set(tokens.tolist()) == {0}  # untempered, top-p 0.8 would have kept token 1 too
    tokens, conf = sample_tokens(logits[None], temperature=0.5, top_p=0.99, generator=gen)
    kept = (logits / 0.5).softmax(-1)
    kept = kept * nucleus(logits / 0.5, 0.99)
    assert torch.allclose(conf.float(), (kept / kept.sum())[tokens])  # confidence: the tempered, filtered probability


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    a, _ = sample_tokens(logits, 0.9, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b, _ = sample_tokens(logits, 0.9, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c, _ = sample_tokens(logits, 0.9, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_penalties_follow_openai():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([0, 1, 3, 0])
    got = penalize(logits, counts, presence=0.5, frequency=0.25)
    assert torch.allclose(got, torch.tensor([[1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 4.0]]))
