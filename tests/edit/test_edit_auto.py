"""Auto mode (self-correction) on a tiny model trained here: planted corruptions get fixed."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from unmask.diffusion.objective import masked_diffusion_loss
from unmask.edit import edit_text
from unmask.edit.probe import token_probs
from unmask.pipeline import Pipeline

WORDS = ["self", "return", "if", "for", "in", "not", "None", "def", "is", "and", "or", "else", "with", "as"]


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny diffusion model trained on a highly repetitive corpus (a 4-line cycle of one-token words),
    so every token is predictable from its context and a planted wrong word is not."""
    words = [w for w in WORDS if len(tokenizer.encode(" " + w)) == 1][:8]
    assert len(words) == 8
    lines = [" ".join(words[i : i + 4]) + "\n" for i in range(0, len(words), 4)]
    ids = tokenizer.encode("".join(lines) * 24)
    torch.manual_seed(0)
    model = tiny_model(tokenizer, seed=0, max_seq_len=64).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: a second thread only adds overhead
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data, L, B = torch.tensor(ids), 32, 16
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - L, (B,), generator=gen)
        loss = masked_diffusion_loss(model, torch.stack([data[s : s + L] for s in starts]), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    model.eval()
    word_ids = [tokenizer.encode(" " + w)[0] for w in words]
    return Pipeline(model, tokenizer), ids[:36], word_ids


def test_probe_finds_the_planted_token(trained):
    pipe, ids, word_ids = trained
    bad = list(ids)
    bad[17] = next(w for w in word_ids if w != ids[17])
    probs, passes = token_probs(pipe.model, bad)
    assert passes >= 1
    assert int(probs.argmin()) == 17
    strided, _ = token_probs(pipe.model, bad, stride=3)  # the cheaper estimate agrees on the culprit
    assert int(strided.argmin()) == 17


def test_auto_mode_fixes_planted_corruptions_more_often_than_chance(trained):
    pipe, ids, word_ids = trained
    tok = pipe.tokenizer
    original = tok.decode(ids)
    # a clean text is left alone: nothing is improbable
    clean = edit_text(pipe, original, mode="auto")
    assert clean.text == original and clean.spans == []
    rng = random.Random(0)
    trials, fixed = 8, 0
    for _ in range(trials):
        i = rng.randrange(2, len(ids) - 2)
        bad = list(ids)
        bad[i] = rng.choice([w for w in word_ids if w != ids[i]])
        corrupted = tok.decode(bad)
        r = edit_text(pipe, corrupted, mode="auto", max_rounds=3)
        fixed += r.text == original
        if r.text == original:  # the report names the one region that changed
            assert len(r.spans) == 1
    # chance: an editor that re-masks one position blindly restores the text only if it hits the
    # corrupted token, 1 / len(ids) per trial (and even then must guess the right word)
    chance = trials / len(ids)
    assert fixed >= 6 and fixed > 4 * chance, f"fixed {fixed}/{trials}, chance {chance:.2f}"


def test_auto_mode_only_touches_the_given_spans(trained):
    pipe, ids, word_ids = trained
    tok = pipe.tokenizer
    i = next(k for k in range(18, len(ids)) if ids[k] in word_ids and ids[k - 1] in word_ids)  # mid-line word
    bad = list(ids)
    bad[i] = next(w for w in word_ids if w != ids[i])
    corrupted = tok.decode(bad)
    start = len(tok.decode(bad[:i]))
    end = len(tok.decode(bad[: i + 1]))
    # the corruption lies outside the allowed region: nothing may change
    r = edit_text(pipe, corrupted, mode="auto", spans=[(0, start - 1)])
    assert r.text[start - 1 :] == corrupted[start - 1 :]
    # inside it: fixed
    r = edit_text(pipe, corrupted, mode="auto", spans=[(start - 3, end + 3)])
    assert r.text == tok.decode(ids)
