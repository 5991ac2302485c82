"""Training helpers shared by the train, data, eval and CLI tests: a tiny model shape, a corpus folder, a
training config, and the one-thread fixture (import it into a test module to make it autouse there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unmask.train.config import load_config

TINY_MODEL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, block_size=8)


def make_corpus(root: Path, texts: list[str], tokenizer, n_train: int = 16, n_val: int = 2) -> Path:
    """A corpus folder as `unmask corpus` + `unmask tokenizer` would write it."""
    root.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("train", texts[:n_train]), ("val", texts[n_train : n_train + n_val])):
        with open(root / f"{name}.jsonl", "w") as f:
            for t in chunk:
                f.write(json.dumps({"text": t}) + "\n")
    tokenizer.save(root / "tokenizer")
    return root


def tiny_train_config(corpus: Path, out: Path, **over):
    base = {"out_dir": str(out), "data": {"corpus": str(corpus)}, "model": dict(TINY_MODEL), "seq_len": 32,
            "batch_size": 8, "steps": 30, "eval_interval": 0, "eval_sequences": 8, "eval_samples": 2,
            "checkpoint_interval": 0, "log_interval": 1, "device": "cpu",
            "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0}}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(base=base)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CI box they lose a lot to contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
