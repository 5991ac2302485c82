"""Confidences are computed as LLaDA's and Fast-dLLM's samplers compute them: a float64 softmax of all the
logits, the mask token's share included. Hand-built near-ties that float32 (or a softmax without the mask)
ranks the other way decide which position a step commits."""

import pytest
import torch

from engine_helpers import ScriptedModel
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.decoding.reference import reference_generate

PROMPT = [5, 6]  # the two masks after it sit at positions 2 (first) and 3 (second)


class TableModel(ScriptedModel):
    """Fixed logits per position (whatever the input), recording every input it is given."""

    def __init__(self, tokenizer, table: dict[int, torch.Tensor]):
        super().__init__(tokenizer, lambda pos, cur: (0, 0.5))
        self.table, self.seen = table, []

    def forward(self, input_ids, positions=None, cache=None, return_hidden=False, **_):
        B, T = input_ids.shape
        positions = torch.arange(T).expand(B, -1) if positions is None else positions
        self.seen.append(input_ids.clone())
        V = self.config.vocab_size
        out = torch.stack([torch.stack([self.table.get(int(p), torch.zeros(V)) for p in row]) for row in positions])
        return out if return_hidden else self.output(out)


def near_tie(tokenizer, later_wins_by: str) -> dict[int, torch.Tensor]:
    """Both masks propose token 7 with the same logit; the second position's confidence is higher in
    float64, by a margin float32 does not see ("float32") or that only the mask's logit makes ("mask")."""
    V, mask = tokenizer.vocab_size, tokenizer.mask_id
    first, second = torch.zeros(V), torch.zeros(V)
    first[7] = second[7] = 4.0
    if later_wins_by == "float32":
        first[8] = 2.0**-26  # in float32 exp() of it rounds to 1: the two rows tie exactly
    else:
        first[mask] = 3.0  # ... by the mask's probability, which a softmax without the mask leaves out
    return {2: first, 3: second}


def confidences(row: torch.Tensor, dtype: torch.dtype, mask_id: int | None = None) -> float:
    if mask_id is not None:
        row = row.clone()
        row[mask_id] = float("-inf")
    return float(row.to(dtype).softmax(-1)[7])


@pytest.mark.parametrize("later_wins_by", ["float32", "mask"])
def test_the_premise_the_other_arithmetic_does_not_prefer_the_second_position(tokenizer, later_wins_by):
    t = near_tie(tokenizer, later_wins_by)
    assert confidences(t[3], torch.float64) > confidences(t[2], torch.float64)  # the references' ranking
    if later_wins_by == "float32":
        assert confidences(t[3], torch.float32) <= confidences(t[2], torch.float32)
    else:
        mask = tokenizer.mask_id
        assert confidences(t[3], torch.float64, mask) == confidences(t[2], torch.float64, mask)


@pytest.mark.parametrize("later_wins_by", ["float32", "mask"])
def test_the_reference_sampler_commits_the_float64_choice(tokenizer, later_wins_by):
    model = TableModel(tokenizer, near_tie(tokenizer, later_wins_by))
    reference_generate(model, torch.tensor([PROMPT]), gen_length=2, block_length=2, steps=2)
    second_step_input = model.seen[1][0, 2:].tolist()
    assert second_step_input == [tokenizer.mask_id, 7]  # the second position went first


@pytest.mark.parametrize("later_wins_by", ["float32", "mask"])
@pytest.mark.parametrize("policy,cache", [("fixed", "none"), ("fixed", "prefix"), ("fixed", "dual"),
                                          ("threshold", "prefix"), ("threshold", "dual")])
def test_the_engine_commits_the_position_the_references_commit(tokenizer, later_wins_by, policy, cache):
    # fixed + no cache: LLaDA's generate; prefix / dual cache with one token a step: Fast-dLLM's
    model = TableModel(tokenizer, near_tie(tokenizer, later_wins_by))
    options = DecodeOptions(max_new_tokens=2, block_length=2, policy=policy, threshold=1.0, steps=2, cache=cache,
                            early_stop=False)
    events = list(Engine(model).stream(PROMPT, options))
    assert events[0].changed == [1] and events[0].canvas == [tokenizer.mask_id, 7]
    assert events[-1].result.tokens == [7, 7]


def test_the_mask_keeps_its_share_but_is_never_written_not_even_by_self_correction(tokenizer):
    # the mask is the model's most probable token everywhere (0.95 >= rewrite_above): still no [MASK] is written
    model = ScriptedModel(tokenizer, lambda pos, cur: (tokenizer.mask_id, 0.95))
    options = DecodeOptions(max_new_tokens=4, block_length=4, policy="threshold", threshold=0.9, self_correct=True,
                            rewrite_above=0.9, remask_below=0.0, early_stop=False, cache="none")
    final = list(Engine(model).stream(PROMPT, options))[-1]
    assert final.done and len(final.canvas) == 4 and tokenizer.mask_id not in final.canvas
