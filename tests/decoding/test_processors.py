"""Logits processors: each one's job alone, and the chain processors_for builds from a request's options."""

import math

import torch

from unmask.decoding.options import DecodeOptions
from unmask.decoding.processors import (BannedTokens, FirstTokenRestriction, LogitBias, Penalties, Temperature,
                                        TopK, TopP, processors_for)
from unmask.decoding.sampling import decision_logits, penalize

NEG = float("-inf")


def test_banned_tokens_become_impossible_everywhere():
    logits = torch.zeros(3, 5)
    out = BannedTokens(torch.tensor([False, True, False, False, True]))(logits, block=2)
    assert (out[:, [1, 4]] == NEG).all() and (out[:, [0, 2, 3]] == 0).all()
    assert (logits == 0).all()  # the input is left alone


def test_first_token_restriction_applies_to_the_first_position_of_the_first_block():
    allowed = torch.tensor([True, False, True, False])
    logits = torch.ones(3, 4)
    out = FirstTokenRestriction(allowed)(logits, block=0)
    assert out[0].tolist() == [1, NEG, 1, NEG] and (out[1:] == 1).all()
    assert torch.equal(FirstTokenRestriction(allowed)(logits, block=1), logits)


def test_logit_bias_adds_its_vector_to_every_position():
    bias = torch.tensor([0.0, 5.0, -100.0])
    out = LogitBias(bias)(torch.ones(2, 3), block=0)
    assert out.tolist() == [[1.0, 6.0, -99.0]] * 2


def test_penalties_count_committed_generated_tokens_as_the_canvas_changes():
    mask = 9
    canvas = torch.tensor([2, 2, mask, mask, mask])  # a prompt of two 2s, then three generated positions
    generated = canvas == mask
    p = Penalties(presence=0.5, frequency=0.25, canvas=canvas, generated=generated, mask_id=mask)
    logits = torch.zeros(1, 10)
    assert (p(logits, 0) == 0).all()  # the prompt's tokens do not count, masks neither
    canvas[2], canvas[4] = 3, 3  # the engine writes the canvas in place
    out = p(logits, 0)
    assert out[0, 3] == -(0.5 + 2 * 0.25) and out[0, 2] == 0 and out[0, mask] == 0
    counts = torch.bincount(torch.tensor([3, 3]), minlength=10)
    assert torch.equal(out, penalize(logits, counts, 0.5, 0.25))


def test_temperature_divides():
    assert Temperature(0.5)(torch.tensor([[1.0, -2.0]]), 0).tolist() == [[2.0, -4.0]]


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert TopK(2)(logits, 0).isfinite().tolist() == [[True, False, True, True, False]]
    assert torch.equal(TopK(5)(logits, 0), logits)


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0, -2.0]])  # p = 0.595, 0.361, 0.030, ...
    assert TopP(0.9)(logits, 0).isfinite().tolist() == [[True, True, False, False, False]]
    assert TopP(0.5)(logits, 0).isfinite().sum() == 1


def test_processors_for_builds_only_what_the_options_ask_for():
    chain = processors_for(DecodeOptions(), 16, "cpu")
    assert not (chain.restricting or chain.adjusting or chain.deciding)
    logits = torch.randn(4, 16)
    assert chain.adjust(chain.restrict(logits, 0), 0) is logits and chain.decide(logits) is logits

    canvas = torch.tensor([1, 15, 15])
    o = DecodeOptions(temperature=0.7, top_k=5, top_p=0.9, logit_bias={3: 2.0}, frequency_penalty=0.5)
    chain = processors_for(o, 16, "cpu", banned=torch.arange(16) == 4, first_allowed=torch.arange(16) < 8,
                           canvas=canvas, generated=canvas == 15, mask_id=15)
    assert [type(p) for p in chain.restricting] == [BannedTokens]
    assert [type(p) for p in chain.adjusting] == [FirstTokenRestriction, LogitBias, Penalties]
    assert [type(p) for p in chain.deciding] == [Temperature, TopK, TopP]


def test_the_chain_is_the_engine_arithmetic_it_replaced():
    # banned -> healing -> bias -> penalties, then temperature -> top-k -> top-p, as the inline code did
    V, mask = 32, 31
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    canvas = torch.tensor([5, 7, 7, mask, mask, mask, mask, mask, mask])
    generated = torch.tensor([False, False, True, True, True, True, True, True, True])
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[0, 9]] = True
    allowed = torch.arange(V) % 2 == 0
    o = DecodeOptions(temperature=0.8, top_k=12, top_p=0.9, logit_bias={4: 1.5, 6: -3.0}, presence_penalty=0.3,
                      frequency_penalty=0.6)
    chain = processors_for(o, V, "cpu", banned=banned, first_allowed=allowed, canvas=canvas, generated=generated,
                           mask_id=mask)

    want = logits.clone()
    want.masked_fill_(banned, NEG)
    want[0].masked_fill_(~allowed, NEG)
    want += torch.tensor([1.5 if t == 4 else -3.0 if t == 6 else 0.0 for t in range(V)])
    counts = torch.bincount(canvas[generated & (canvas != mask)], minlength=V)
    want = decision_logits(penalize(want, counts, 0.3, 0.6), 0.8, 12, 0.9)
    got = chain.decide(chain.adjust(chain.restrict(logits, 0), 0))
    assert torch.equal(got, want)
    assert math.isclose(float(got.softmax(-1)[0, 1::2].sum()), 0.0)  # healing: only even ids first
