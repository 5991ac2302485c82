"""Shared fixtures: a tokenizer trained on real stdlib sources and tiny models built in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads cost more than they give

from unmask.model.config import ModelConfig  # noqa: E402
from unmask.model.transformer import Transformer  # noqa: E402
from unmask.pipeline import Pipeline  # noqa: E402
from unmask.tokenizer import Tokenizer  # noqa: E402


def stdlib_texts(limit: int = 60) -> list[str]:
    """Real Python source from the standard library (json, email, ... packages): our offline corpus."""
    root = Path(json.__file__).parent.parent
    files = sorted(p for d in ("json", "email", "http", "logging", "unittest") for p in (root / d).glob("*.py"))
    return [p.read_text(encoding="utf-8", errors="replace") for p in files[:limit]]


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return stdlib_texts()


@pytest.fixture(scope="session")
def tokenizer(corpus_texts) -> Tokenizer:
    return Tokenizer.train(corpus_texts, vocab_size=512)


def tiny_config(tokenizer: Tokenizer, **overrides) -> ModelConfig:
    base = dict(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, block_size=8)
    return ModelConfig(**{**base, **overrides})


def tiny_model(tokenizer: Tokenizer, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(tokenizer, **overrides)).init_weights(seed).eval()


@pytest.fixture
def tiny_pipeline(tokenizer) -> Pipeline:
    return Pipeline(tiny_model(tokenizer), tokenizer)


@pytest.fixture
def saved_model_dir(tmp_path, tiny_pipeline) -> Path:
    path = tmp_path / "tiny"
    tiny_pipeline.save(path)
    return path


@pytest.fixture
def prefer(pipe):
    """prefer(token_id): add a large bonus to one token's logit (a model with a known preference); the
    hooks are removed after the test. Needs a `pipe` fixture in the test module."""
    handles = []

    def _prefer(token_id: int, bonus: float = 100.0):
        def hook(module, args, output):
            output = output.clone()
            output[..., token_id] += bonus
            return output

        handles.append(pipe.model.output.register_forward_hook(hook))

    yield _prefer
    for h in handles:
        h.remove()
