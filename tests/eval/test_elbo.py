"""ELBO / NLL evaluation in bits per byte."""

from __future__ import annotations

import math

import numpy as np
import torch

from conftest import tiny_model
from train_helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from unmask.diffusion.objective import token_nll
from unmask.eval.elbo import evaluate_bits_per_byte, token_stream, window_starts


def test_causal_score_is_the_exact_nll_of_every_token(tokenizer):
    model = tiny_model(tokenizer, attention="causal", max_seq_len=64)
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"]
    stream = token_stream(texts, tokenizer)
    assert len(stream) < 64
    r = evaluate_bits_per_byte(model, tokenizer, stream, seq_len=64)
    x = torch.from_numpy(stream)[None]
    with torch.no_grad():
        exact = token_nll(model(x[:, :-1]), x[:, 1:]).sum().item()
    assert r.exact and math.isclose(r.nats, exact, rel_tol=1e-5)
    assert r.tokens == len(stream) - 1 and r.bytes == sum(len(t.encode()) for t in texts)
    assert math.isclose(r.bits_per_byte, exact / math.log(2) / r.bytes, rel_tol=1e-6)


def test_windows_cover_the_stream_once(tokenizer, corpus_texts):
    stream = token_stream(corpus_texts[:2], tokenizer)
    model = tiny_model(tokenizer, max_seq_len=32)
    r = evaluate_bits_per_byte(model, tokenizer, stream, seq_len=32, n_samples=1)
    assert r.tokens == len(stream) - 1 and not r.exact
    assert r.bytes == sum(len(t.encode()) for t in corpus_texts[:2])
    starts = window_starts(len(stream), 32, max_windows=5)
    assert len(starts) == 5 and starts[0] == 1 and starts[-1] == window_starts(len(stream), 32)[-1]


def test_diffusion_elbo_is_seeded_and_bounds_a_uniform_guess(tokenizer, corpus_texts):
    model = tiny_model(tokenizer, max_seq_len=32)
    stream = token_stream(corpus_texts[:1], tokenizer)[:200]
    a = evaluate_bits_per_byte(model, tokenizer, stream, seq_len=32, n_samples=2, seed=1)
    b = evaluate_bits_per_byte(model, tokenizer, stream, seq_len=32, n_samples=2, seed=1)
    assert a.nats == b.nats
    # an untrained model predicts ~uniformly: nats/token close to log(vocab)
    assert abs(a.nats_per_token - np.log(model.config.vocab_size)) < 0.5
