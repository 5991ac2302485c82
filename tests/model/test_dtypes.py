"""The automatic compute dtype (model/dtypes.py) and unmask.load's dtype / quantize arguments."""

from __future__ import annotations

import pytest
import torch

import unmask
from conftest import tiny_model
from unmask.model import dtypes


@pytest.mark.parametrize("native,attention,small,want", [
    (True, "bidirectional", False, torch.bfloat16),
    (True, "block_causal", False, torch.bfloat16),
    (True, "causal", False, None),  # one-token AR steps are faster in float32 on these CPUs
    (False, "bidirectional", False, None),  # no bf16 units: float32
    (True, "bidirectional", True, None),  # tiny: overhead-bound, keeps its dtype
])
def test_auto_dtype(tokenizer, monkeypatch, native, attention, small, want):
    monkeypatch.setattr(dtypes, "native_cpu_bf16", lambda: native)
    if not small:
        monkeypatch.setattr(dtypes, "AUTO_BF16_MIN_PARAMS", 1)
    assert dtypes.auto_dtype(tiny_model(tokenizer, attention=attention)) == want


def test_load_picks_the_auto_dtype_unless_one_is_given(saved_model_dir, monkeypatch):
    monkeypatch.setattr(dtypes, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(dtypes, "AUTO_BF16_MIN_PARAMS", 1)
    assert unmask.load(saved_model_dir, device="cpu").model.tok_embeddings.weight.dtype == torch.bfloat16
    assert unmask.load(saved_model_dir, device="cpu", dtype="auto").model.tok_embeddings.weight.dtype == torch.bfloat16
    assert unmask.load(saved_model_dir, device="cpu", dtype="float32").model.tok_embeddings.weight.dtype == torch.float32


def test_load_quantizes_and_a_saved_copy_loads_quantized(saved_model_dir, tmp_path):
    pipe = unmask.load(saved_model_dir, device="cpu", dtype="float32", quantize="int8")
    assert pipe.config.quantization == "int8"
    assert pipe.model.layers[0].attention.wq.weight.dtype == torch.int8
    want = pipe.generate("def f(x):", max_new_tokens=8, block_length=8).tokens
    pipe.save(tmp_path / "q")
    again = unmask.load(tmp_path / "q", device="cpu", dtype="float32")
    assert again.config.quantization == "int8"
    assert again.generate("def f(x):", max_new_tokens=8, block_length=8).tokens == want
