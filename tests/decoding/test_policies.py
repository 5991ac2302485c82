"""Unmasking policies and confidence measures, on hand-made confidences and a scripted model."""

import math

import pytest
import torch

from engine_helpers import ScriptedModel
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.policies import confidence, make_policy

CONF = torch.tensor([0.95, 0.20, 0.99, 0.50, 0.91, 0.30], dtype=torch.float64)
ALL = torch.ones(6, dtype=torch.bool)


def chosen(mask):
    return mask.nonzero().flatten().tolist()


def test_fixed_policy_follows_the_even_schedule_most_confident_first():
    p = make_policy(DecodeOptions(policy="fixed"))
    p.start_block(n_masks=6, steps_budget=4)  # 2, 2, 1, 1
    assert p.schedule == [2, 2, 1, 1]
    assert chosen(p.select(CONF, ALL, 0)) == [0, 2]
    left = ALL.clone()
    left[[0, 2]] = False
    assert chosen(p.select(CONF, left, 1)) == [3, 4]


def test_threshold_commits_all_confident_and_at_least_one():
    p = make_policy(DecodeOptions(policy="threshold", threshold=0.9))
    assert chosen(p.select(CONF, ALL, 0)) == [0, 2, 4]
    low = torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64)
    assert chosen(p.select(low, torch.ones(3, dtype=torch.bool), 0)) == [1]
    only = torch.tensor([False, False, True, True, False, False])  # non-candidates never commit
    assert chosen(p.select(CONF, only, 0)) == [2]


def test_threshold_one_commits_exactly_one_even_when_certain():
    p = make_policy(DecodeOptions(policy="threshold", threshold=1.0))
    certain = torch.ones(5, dtype=torch.float64)
    assert chosen(p.select(certain, torch.ones(5, dtype=torch.bool), 0)) == [0]


def test_factor_rule():
    # sorted: 0.99, 0.95, 0.91, 0.5 ...; f = 0.3: thresholds 1 - 0.3/(i+1) = 0.85, 0.9, 0.925, 0.94
    p = make_policy(DecodeOptions(policy="factor", factor=0.3))
    assert chosen(p.select(CONF, ALL, 0)) == [0, 2]  # 0.91 < 0.925 stops the run at two
    p = make_policy(DecodeOptions(policy="factor", factor=1.0))  # 0.5, 0.667, 0.75, 0.8, 0.833
    assert chosen(p.select(CONF, ALL, 0)) == [0, 2, 4]
    p = make_policy(DecodeOptions(policy="factor", factor=0.01))
    assert chosen(p.select(CONF, ALL, 0)) == [2]  # at least one


def test_entropy_bound_policy_bounds_the_summed_error_of_a_step():
    # surest first: 0.99, 0.95, 0.91, 0.5, 0.3, 0.2 -> errors 0.010, 0.051, 0.094, 0.693, 1.204, 1.609
    # a token goes if the errors of the surer ones sum to <= γ: cumulative before = 0, 0.010, 0.061, 0.155, ...
    def commits(gamma, conf=CONF, candidates=ALL):
        return chosen(make_policy(DecodeOptions(policy="eb", entropy_bound=gamma)).select(conf, candidates, 0))

    assert commits(0.0) == [2]  # only the surest: nothing precedes it
    assert commits(0.05) == [0, 2]  # 0.010 before the second
    assert commits(0.1) == [0, 2, 4]  # 0.061 before the third, 0.155 > 0.1 before the fourth
    assert commits(0.2) == [0, 2, 3, 4]
    assert commits(100.0) == [0, 1, 2, 3, 4, 5]
    only = torch.tensor([False, True, False, True, False, True])  # non-candidates neither commit nor count
    assert commits(0.8, candidates=only) == [3, 5]  # 0.5 then 0.3 (0.693 before it); 0.2 has 1.9 before
    certain = torch.ones(4, dtype=torch.float64)
    assert commits(0.0, conf=certain, candidates=torch.ones(4, dtype=torch.bool)) == [0, 1, 2, 3]
    with pytest.raises(OptionsError, match="entropy_bound"):
        DecodeOptions(policy="eb", entropy_bound=-1)


def test_eb_policy_decodes_more_per_step_as_its_bound_grows(tokenizer):
    # position i of the answer is proposed with confidence 0.99 - 0.1 * (i % 4): runs of sure and unsure
    model = ScriptedModel(tokenizer, lambda pos, cur: (100 + pos, 0.99 - 0.1 * (pos % 4)))
    steps = []
    for gamma in (0.0, 0.2, 1.0, 100.0):
        r = Engine(model).generate([5, 6, 7, 8], DecodeOptions(max_new_tokens=16, block_length=8, policy="eb",
                                                               entropy_bound=gamma, early_stop=False))
        assert r.tokens == [104 + i for i in range(16)]
        steps.append(r.steps)
    assert steps[0] == 16 and steps[-1] == 2  # one token a step ... the whole block at once
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 4


def test_confidence_measures():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]], dtype=torch.float64)
    tok = torch.tensor([0, 1])
    assert torch.allclose(confidence("prob", probs, tok), torch.tensor([0.7, 0.4], dtype=torch.float64))
    assert torch.allclose(confidence("margin", probs, tok), torch.tensor([0.5, 0.0], dtype=torch.float64))
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert confidence("entropy", probs, tok)[0].item() == pytest.approx(math.exp(-h))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    r1, r2 = confidence("random", probs, tok, g1), confidence("random", probs, tok, g2)
    assert torch.equal(r1, r2) and ((0 <= r1) & (r1 < 1)).all()


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(OptionsError, match="policy must be"):
        DecodeOptions(policy="greedy-ish")


@pytest.mark.parametrize("kind, steps", [("prob", 5), ("margin", 5), ("entropy", 8)])
def test_threshold_policy_in_the_engine_uses_the_confidence_measure(tokenizer, kind, steps):
    # position p is predicted at probability 0.97 for even p and 0.6 for odd p
    model = ScriptedModel(tokenizer, lambda pos, cur: (100 + pos, 0.97 if pos % 2 == 0 else 0.6))
    o = DecodeOptions(max_new_tokens=8, block_length=8, policy="threshold", threshold=0.9, confidence=kind,
                      early_stop=False)
    r = Engine(model).generate([5, 6], o)
    assert r.tokens == [102 + i for i in range(8)]
    # prob/margin: the 4 sure positions at once, then the unsure ones one by one; exp(-entropy) of a
    # 0.97 peak over 512 tokens is only ~0.72, so under entropy nothing clears 0.9: one per step
    assert r.steps_per_block == [steps]


def test_verify_commits_while_the_fed_inputs_match():
    from unmask.decoding.policies import VerifyPolicy

    p = VerifyPolicy(DecodeOptions(policy="verify"))
    M = 99
    cur = torch.tensor([7, M, M, M, M, M])  # position 0 committed, 1.. open
    proposed = torch.tensor([0, 10, 11, 12, 13, 14])
    follows = torch.ones(6, dtype=torch.bool)
    open_ = cur == M
    # drafts at 1 and 2 right, 3 wrong: 1 (read from committed 0), 2 (fed 10 == 10), 3 (fed 11 == 11) commit;
    # 4 is read from position 3, fed 55 != 12, so it stays open
    fed = torch.tensor([7, 10, 11, 55, M, M])
    assert chosen(p.verify(proposed, cur, fed, open_, follows)) == [1, 2, 3]
    # all masks fed: only the leftmost (read from committed text)
    fed = torch.tensor([7, M, M, M, M, M])
    assert chosen(p.verify(proposed, cur, fed, open_, follows)) == [1]
    # a gap in the canvas breaks the chain even when the draft matched
    gap = follows.clone()
    gap[2] = False
    fed = torch.tensor([7, 10, 11, 12, M, M])
    assert chosen(p.verify(proposed, cur, fed, open_, gap)) == [1]
    assert chosen(p.verify(proposed, cur, fed, open_, follows)) == [1, 2, 3, 4]


def test_verify_keeps_look_ahead_drafts_only_after_a_clean_prefix():
    from unmask.decoding.policies import VerifyPolicy

    p = VerifyPolicy(DecodeOptions(policy="verify"))
    M = 99
    proposed = torch.tensor([0, 10, 11, 12, 13, 14])
    follows = torch.ones(6, dtype=torch.bool)
    still_open = torch.tensor([False, False, False, True, True, True])
    # the run stopped because position 2 read a mask: the proposals after it are look-ahead from right text
    clean = p.next_inputs(proposed, torch.tensor([7, 10, M, M, M, M]), still_open, follows, M)
    assert clean.tolist() == [M, M, M, 12, 13, 14]
    # it stopped at a wrong draft at position 2: everything after is stale and goes back to masks
    stale = p.next_inputs(proposed, torch.tensor([7, 10, 55, M, M, M]), still_open, follows, M)
    assert stale.tolist() == [M] * 6


def test_copy_draft_takes_what_followed_the_longest_latest_match():
    from unmask.decoding.drafts import copy_draft

    ctx = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    assert copy_draft(ctx, 2) == [5, 6]  # "2 3" last seen before "5 6"; longest (3) finds nothing
    assert copy_draft([1, 2, 3, 8, 1, 2, 3, 7, 2, 3], 3) == [7, 2, 3]  # n=2 latest occurrence
    assert copy_draft([4, 1, 2, 3, 9, 9, 1, 2, 3], 2) == [9, 9]  # n=3 match preferred
    assert copy_draft([1, 2, 3], 4) == []
    assert copy_draft([5], 4) == []
