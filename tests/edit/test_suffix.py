"""Suffix scoring on tiny left-to-right models (edit/suffix.py, edit/left_to_right.py, edit/instruct.py): the
scores are the model's own log-probabilities, candidates end where a region may end, edits stay inside it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from unmask.decoding.ar import ar_generate
from unmask.edit.canvas import encode_literal
from unmask.edit.instruct import apply_changed_lines
from unmask.edit.suffix import (Ending, byte_level, fill_gap, healed_prefix, propose, reads_left_to_right,
                                run_prefix, score)
from unmask.pipeline import Pipeline

LEFT_TO_RIGHT = dict(attention="block_causal", block_attention="causal", logits_shift=True, adapter_rank=4,
                     adapter_tokens="masks")


@pytest.fixture(scope="module")
def pipe(tokenizer) -> Pipeline:
    return Pipeline(tiny_model(tokenizer, seed=3, **LEFT_TO_RIGHT), tokenizer)


def full_logprob(model, ids: list[int]) -> float:
    """log p(ids[1:] | ids[0]) from one plain forward pass (shifted logits: output i predicts token i)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    return float(sum(logits[i, ids[i]] for i in range(1, len(ids))))


def test_a_model_reads_left_to_right_only_with_causal_blocks(tokenizer):
    assert reads_left_to_right(tiny_model(tokenizer, **LEFT_TO_RIGHT).config)
    assert not reads_left_to_right(tiny_model(tokenizer).config)


def test_scores_are_the_models_log_probabilities(pipe):
    prefix = encode_literal(pipe.tokenizer, "def f(x):\n    return")
    texts = [" x + 1\n", " 2 * x\n\nprint(f(3))\n", ""]
    pre = run_prefix(pipe.model, prefix, room=32)
    scores, passes = score(pipe.model, pipe.tokenizer, pre, texts, pipe.config.pad_id)
    assert passes == 1 and scores[2] == 0.0
    for text, got in zip(texts[:2], scores):
        ids = prefix + encode_literal(pipe.tokenizer, text)
        assert got == pytest.approx(full_logprob(pipe.model, ids) - full_logprob(pipe.model, prefix), abs=1e-3)


def test_the_greedy_proposal_is_the_base_models_greedy_text(pipe, tokenizer):
    prefix = encode_literal(tokenizer, "import os\n\n\ndef main():\n")
    pre = run_prefix(pipe.model, prefix, room=16)
    [greedy, *_], _ = propose(pipe.model, tokenizer, pre, "", Ending("", 10), 3, 8, banned=set(), ends=set())
    base = Pipeline(tiny_model(tokenizer, seed=3, attention="causal", logits_shift=True, adapter_rank=4,
                               adapter_tokens="masks"), tokenizer)
    base.model.load_state_dict(pipe.model.state_dict())
    assert greedy.tokens == ar_generate(base.model, prefix, max_new_tokens=8).tokens


def test_proposals_spell_the_healed_end_of_the_prefix_first(pipe, tokenizer):
    ids, forced = healed_prefix(tokenizer, "def f(x):\n    ", room=16, max_len=128, fallback_id=0)
    assert forced.endswith("\n    ") and tokenizer.decode(ids) + forced == "def f(x):\n    "
    pre = run_prefix(pipe.model, ids, room=16)
    proposals, _ = propose(pipe.model, tokenizer, pre, forced, Ending("\n", 0), 4, 12, banned=set(), ends=set())
    assert all(tokenizer.decode(p.tokens).startswith(forced) for p in proposals)


@pytest.mark.parametrize("suffix, max_newlines, text, cuts", [
    ("\nnext()", 0, "a = 1\nb = 2\n", ["a = 1"]),
    ("\nnext()", 1, "a = 1\nb = 2\nc", ["a = 1", "a = 1\nb = 2"]),
    (")\n", 0, "values) + len(x)\n", ["values", "values) + len(x"]),
    (")\n", 0, "values\n) x", []),  # never across a newline the region does not hold
    ('": 1}', 0, 'port": 8080', ["port"]),
])
def test_a_middle_ends_where_the_region_may_end(suffix, max_newlines, text, cuts):
    assert Ending(suffix, max_newlines).cuts(text) == cuts


def test_byte_level_spells_tokens_as_the_vocabulary_does(tokenizer):
    ids = encode_literal(tokenizer, "\n    x")
    strings = {i: s for s, i in tokenizer.hf.get_vocab().items()}
    assert "".join(strings[i] for i in ids) == byte_level("\n    x")


def test_infill_keeps_prefix_and_suffix_and_ends_at_the_line(pipe):
    prefix, suffix = "def f(x):\r\n    ", "\r\n    return y  # é\r\n"
    r = pipe.infill(prefix, suffix, max_new_tokens=8, max_lines=1)
    assert r.text == prefix + r.middle + suffix
    assert "\n" not in r.middle and r.steps >= 2  # a prefix pass, proposals, a scoring pass


def test_a_gap_takes_the_candidate_the_suffix_favours(pipe, monkeypatch):
    import unmask.edit.suffix as suffix_mod

    def fake_score(model, tokenizer, prefix, texts, pad_id, splits):
        return [(0.0, 10.0 if "zz" in t else 0.0) for t in texts], 1

    monkeypatch.setattr(suffix_mod, "score", fake_score)
    choice = fill_gap(pipe, "x = ", "\n", Ending("\n", 0), max_tokens=4, extra=["zz"])
    assert choice.middle == "zz" and choice.candidates["zz"] == 10.0


def test_split_scores_add_up_to_the_whole(pipe):
    pre = run_prefix(pipe.model, encode_literal(pipe.tokenizer, "x = "), room=16)
    texts = ["1 + 2\nprint(x)", "y\nprint(x)"]
    whole, _ = score(pipe.model, pipe.tokenizer, pre, texts, pipe.config.pad_id)
    parts, _ = score(pipe.model, pipe.tokenizer, pre, texts, pipe.config.pad_id, splits=[5, 1])
    assert [a + b for a, b in parts] == pytest.approx(whole, abs=1e-4)
    assert all(a < 0 and b < 0 for a, b in parts)


def test_span_edits_change_nothing_outside_their_regions(pipe):
    text = "a = 1\r\nb = vaules  # é\r\nc = 3\r\n"
    s = text.index("vaules")
    r = pipe.edit(text, spans=[(s, s + 6)], max_new_tokens=8)
    new = r.replacements[0]
    assert r.text == text[:s] + new + text[s + 6:] and "\n" not in new


def test_instruction_edits_replace_only_changed_lines_inside_regions():
    original = "def f(total):\r\n    total += 1\r\n    return total\r\n"
    answer = "def f(acc):\n    acc += 1\n    return acc\n"
    text, spans, repl = apply_changed_lines(original, answer, [(0, len(original))])
    assert text == original.replace("total", "acc") and len(spans) == 3
    second_line = (original.index("    total"), original.index("    return"))
    text, spans, _ = apply_changed_lines(original, answer, [second_line])
    assert text == original.replace("    total += 1", "    acc += 1")  # the other changes lie outside
    assert apply_changed_lines(original, original.replace("\r\n", "\n"), [(0, len(original))])[0] == original


def test_a_later_auto_round_re_decides_only_words_it_has_not_kept(pipe, monkeypatch):
    """Every token is a suspect here; the first round re-decides each word once and fixes one. The next
    round reads the text again but re-decides only the new word: the kept ones are settled."""
    import unmask.edit.left_to_right as ltr
    from unmask.edit.suffix import GapChoice

    decided = []

    def fake_fill_gap(pipe, prefix, suffix, ending, max_tokens, extra, **kw):
        word = extra[0]
        decided.append(word)
        new = "beta" if word == "bta" else word
        return GapChoice(new, 10.0, {word: 0.0, new: 10.0}, 1, 1)

    monkeypatch.setattr(ltr, "suspects", lambda probs, top, allowed, *a: allowed.nonzero().flatten().tolist())
    monkeypatch.setattr(ltr, "fill_gap", fake_fill_gap)
    r = pipe.edit("alpha = bta + gamma\n", mode="auto")
    assert r.text == "alpha = beta + gamma\n"
    assert decided == ["alpha", "=", "bta", "+", "gamma", "beta"]


@pytest.mark.parametrize("token, word", [(" =", "="), ("\n", ""), (" al", "alpha"), ("pha", "alpha"),
                                         ("(v", "(values"), (" ", "")])
def test_a_suspect_token_widens_to_its_word_without_its_whitespace(token, word):
    from unmask.edit.left_to_right import word_span

    text = "x = alpha\nf(values)\n"
    s = text.index(token) if token != " al" else text.index("alpha") - 1
    if token == "pha":
        s = text.index("pha")
    a, b = word_span(text, s, s + len(token))
    assert text[a:b] == word


def test_names_the_suffix_uses_are_candidates_inside_a_started_line():
    from unmask.edit.suffix import names_from

    assert names_from("import ", "\n\nprint(math.sqrt(16))") == ["print", "math", "sqrt"]
    assert names_from("def f():\n    ", "\n    return x\n") == []  # a whole statement: no bare names


def test_a_middle_that_breaks_the_code_or_leaves_a_fault_is_not_chosen():
    from unmask.edit.static import faults
    from unmask.edit.suffix import fitting

    prefix, suffix = "import ", "\n\n\nprint(math.sqrt(16))\n"
    assert fitting(prefix, suffix, ["= 4", "sqrt", "math", "pandas"]) == ["math"]
    assert faults("import sqrt\nprint(math.sqrt(16))") == 1  # math is never bound
    assert faults("def f(a):\n    return a +") is None
    body = "def add(a, b):\n    ", "\n\n\nprint(add(2, 3))\n"
    assert fitting(*body, ["a += b", "return a + b", "pass"]) == ["return a + b"]  # add's value is used
    assert faults("def f(a) -> int:\n    a += 1\n") == 1 and faults("def f(a) -> None:\n    a += 1\n") == 0
    assert faults("def f():\n    def g():\n        return 1\n    g()\nx = f()\n") == 1  # g's return is g's
    assert faults("def f():\n    raise NotImplementedError\nx = f()\n") == 0
    prose = ["the cat", "a dog"]  # not Python: every candidate stays
    assert fitting("I saw ", " today.", prose) == prose
