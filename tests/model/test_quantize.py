"""Weight quantization (model/quantize.py): int8 and fp8 per output row, the quantized adapter, the engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.model.quantize import (QuantizationError, QuantizedAdaptedLinear, QuantizedLinear, quantize_model,
                                   scheme_named)
from unmask.model.transformer import Transformer

SCHEMES = ["int8", "fp8"]
# relative error of one matmul: int8 keeps 7 bits per weight, e4m3 3 bits of mantissa (and fp8 activations)
TOLERANCE = {"int8": 0.02, "fp8": 0.1}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_is_close_to_the_float_one(name, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(dtype)
    linear.weight.data[3] *= 50  # one row far larger than the rest: per-row scales keep the others exact
    q = QuantizedLinear.from_linear(linear, scheme_named(name))
    assert q.weight.dtype == scheme_named(name).storage and q.weight_scale.dtype == torch.float32
    x = torch.randn(2, 5, 64, dtype=dtype)
    got, want = q(x), linear(x)
    assert got.shape == want.shape and got.dtype == dtype
    keep = [i for i in range(48) if i != 3]
    assert relative_error(got[..., keep], want[..., keep]) < TOLERANCE[name]
    dequantized = q.scheme.dequantize(q.weight, q.weight_scale, torch.float32)
    assert relative_error(dequantized, linear.weight.float()) < TOLERANCE[name] / 2


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(QuantizationError, match="unknown quantization 'int3'.*int8, fp8, int4-g32"):
        scheme_named("int3")


@pytest.mark.parametrize("name", SCHEMES)
def test_quantized_model_logits_stay_close(tokenizer, name):
    model = tiny_model(tokenizer).eval()
    q = quantize_model(copy.deepcopy(model), name)
    assert q.config.quantization == name
    assert isinstance(q.output, QuantizedLinear) and isinstance(q.layers[0].feed_forward.w1, QuantizedLinear)
    assert q.tok_embeddings.weight.dtype == torch.float32  # the embedding stays in the compute dtype
    ids = torch.randint(10, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        want, got = model(ids).log_softmax(-1), q(ids).log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean().item()
    assert 0 < kl < {"int8": 1e-3, "fp8": 2e-2}[name]
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(q, "fp8" if name == "int8" else "int8")


def test_quantized_adapter_stays_gated_to_masks(tokenizer):
    from test_lookahead import adapted

    base = tiny_model(tokenizer, attention="causal")
    model = adapted(base)
    q = quantize_model(copy.deepcopy(model), "int8")
    assert isinstance(q.layers[0].attention.wq, QuantizedAdaptedLinear)
    ids = torch.randint(10, tokenizer.vocab_size, (1, 16))
    masked = ids.clone()
    masked[:, 10:] = tokenizer.mask_id
    with torch.no_grad():
        plain, with_masks = q(ids), q(masked)
        assert torch.equal(with_masks[:, :11], plain[:, :11])  # causal: masks change nothing before them
        # the adapter acts at the masks as in the float model
        assert relative_error(with_masks[:, 11:], model(masked)[:, 11:]) < 0.05
        assert not torch.allclose(with_masks[:, 11:], plain[:, 11:])


def test_sparse_adapter_rows_equal_the_dense_gate(tokenizer):
    """Eager CPU inference runs the adapter on the masked rows only; training (grad on) runs it densely."""
    from test_lookahead import adapted

    model = adapted(tiny_model(tokenizer, attention="causal"))
    ids = torch.randint(10, tokenizer.vocab_size, (2, 16))
    ids[0, 5:9] = tokenizer.mask_id
    ids[1, 12:] = tokenizer.mask_id
    with torch.no_grad():
        sparse = model(ids)
        assert model.adapter_gate.rows.tolist() == [5, 6, 7, 8, 28, 29, 30, 31]
    dense = model(ids)
    assert model.adapter_gate.rows is None
    torch.testing.assert_close(sparse, dense.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_engine_decodes_a_quantized_model_batched_as_alone(tokenizer, cache):
    model = quantize_model(tiny_model(tokenizer).eval(), "int8")
    options = DecodeOptions(max_new_tokens=16, block_length=8, cache=cache, policy="threshold", threshold=0.9)
    prompts = [tokenizer.encode("def f(x):"), tokenizer.encode("import os\nimport sys\n")]
    alone = [Engine(model).generate(p, options).tokens for p in prompts]
    engine = Engine(model, max_batch=2)
    ids = [engine.submit(p, options) for p in prompts]
    done = {}
    while engine.has_work():
        done.update({ev.request_id: ev.result.tokens for ev in engine.step() if ev.done})
    assert [done[i] for i in ids] == alone
    assert engine.cache.k.dtype == torch.float64  # CPU attention runs in float64 (grouped_attention), never int8


def test_a_quantized_config_builds_the_quantized_layout(tokenizer):
    model = tiny_model(tokenizer)
    config = copy.deepcopy(model.config)
    config.quantization = "fp8"
    built = Transformer(config)
    assert built.layers[0].attention.wq.weight.dtype == torch.float8_e4m3fn
    assert set(built.state_dict()) == set(quantize_model(copy.deepcopy(model), "fp8").state_dict())


@pytest.mark.parametrize("name", SCHEMES)
def test_a_quantized_model_saves_and_loads_quantized(tokenizer, tmp_path, name):
    from safetensors import safe_open

    from unmask.model.checkpoints import load_model, save_model

    model = quantize_model(tiny_model(tokenizer).eval(), name)
    save_model(model, tmp_path, dtype=torch.bfloat16)  # the compute dtype changes; stored weights and scales not
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert stored["layers.0.attention.wq.weight"] == scheme_named(name).storage
    assert stored["layers.0.attention.wq.weight_scale"] == torch.float32
    assert stored["output.weight"] == scheme_named(name).storage  # an untied head: its own quantized copy
    assert stored["tok_embeddings.weight"] == torch.bfloat16
    loaded = load_model(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert loaded.config.quantization == name
    ids = torch.randint(10, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model.to(torch.bfloat16)(ids))
