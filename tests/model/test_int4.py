"""int4 weights (groups of 32/64/128) and the CPU decode path around them: the packed layout is the kernel's,
GGUF Q4 blocks load into it as they are, fused projections and grouped attention change no result, and a
window decodes exactly as one token at a time (verify == AR) in bf16 with int4 weights."""

from __future__ import annotations

import copy
import dataclasses

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

import unmask
from conftest import tiny_model
from gguf_helpers import write_gguf
from test_lookahead import adapted, sharpen
from unmask.decoding.ar import ar_generate
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.model.gguf import load_gguf_model
from unmask.model.quantize import (Int4Weights, QuantizedLinear, pack_int4, quantize_model, scheme_named,
                                   unpack_int4)
from unmask.model.transformer import grouped_attention, grouped_bias


def int4_sized(tokenizer, **overrides):
    """A tiny model whose every projection fits int4 (output rows in 64s, inputs in groups)."""
    return tiny_model(tokenizer, dim=128, n_heads=4, n_kv_heads=2, ffn_hidden=256, **overrides)


@pytest.mark.parametrize("shape", [(64, 64), (192, 576), (576, 1536)])
def test_packing_is_the_cpu_kernels_layout_and_unpacks(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(pack_int4(codes.to(torch.uint8)), packed)
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_is_the_dequantized_matmul_and_row_invariant(group):
    scheme = scheme_named(f"int4-g{group}")
    w = torch.randn(192, 256)
    weight, scale = scheme.quantize(w)
    deq = scheme.dequantize(weight, scale, torch.float32)
    assert (deq - w).abs().max() <= (w.amax() - w.amin()) / 15  # within one 4-bit step of the group range
    x = torch.randn(12, 256).bfloat16()
    out = scheme.linear(x, weight, scale)
    ref = x.float() @ deq.t()
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())
    alone = torch.cat([scheme.linear(x[i : i + 1], weight, scale) for i in range(12)])
    assert torch.equal(out, alone)  # a window's rows are what one-row calls give


def test_int4_name_aliases_groups_of_32_and_unknown_group_is_refused():
    assert scheme_named("int4").name == "int4-g32"
    with pytest.raises(ValueError, match="unknown quantization 'int4-g48'"):
        scheme_named("int4-g48")


def test_layers_that_do_not_fit_stay_as_they_are(tokenizer):
    model = quantize_model(tiny_model(tokenizer), "int4-g32")  # head_dim 16: K/V have 32 rows
    assert isinstance(model.layers[0].attention.wq, QuantizedLinear)
    assert isinstance(model.layers[0].attention.wk, torch.nn.Linear)
    assert model.layers[0].attention.fused is None  # mixed projections are not fused


def test_fused_projections_give_the_unfused_result_and_share_storage(tokenizer):
    model = quantize_model(int4_sized(tokenizer, attention="causal"), "int4-g32").to(torch.bfloat16)
    attention = model.layers[0].attention
    assert attention.fused is not None and model.layers[0].feed_forward.fused is not None
    assert attention.wk.weight.untyped_storage().data_ptr() == attention.fused.weight.untyped_storage().data_ptr()
    ids = torch.randint(10, tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        fused = model(ids)
        for layer in model.layers:
            layer.attention.fused = layer.feed_forward.fused = None
        assert torch.equal(model(ids), fused)


def test_a_saved_int4_model_loads_quantized_and_fused(tokenizer, tmp_path):
    pipe = unmask.Pipeline(quantize_model(int4_sized(tokenizer), "int4-g64"), tokenizer)
    pipe.save(tmp_path / "m")
    loaded = unmask.load(tmp_path / "m", dtype="float32")
    assert loaded.config.quantization == "int4-g64" and loaded.model.layers[0].attention.fused is not None
    ids = torch.randint(10, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), pipe.model(ids))


def test_grouped_attention_is_sdpa_and_each_row_is_computed_alone():
    B, T, H, KV, S, D = 2, 7, 6, 2, 40, 16
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, KV, S, D).double(), torch.randn(B, KV, S, D).double()
    mask = torch.rand(B, 1, T, S) > 0.3
    mask[..., 0] = True
    mask[:, :, -1, -3:] = False  # the last query does not see the last three keys
    config = dataclasses.replace(unmask.model.config.ModelConfig(), n_heads=H, n_kv_heads=KV)
    out = grouped_attention(q, k, v, grouped_bias(mask, config, torch.float64, B))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2).double(), k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(out, ref.transpose(1, 2).float(), atol=1e-5)
    last = grouped_attention(q[:, -1:], k[..., :-3, :], v[..., :-3, :],  # one query, fewer keys
                             grouped_bias(mask[:, :, -1:, :-3], config, torch.float64, B))
    assert torch.equal(last, out[:, -1:])


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_gguf_q4_blocks_load_into_int4_without_a_float_round_trip(tmp_path, tokenizer, qtype):
    base = int4_sized(tokenizer, attention="causal")
    path = write_gguf(tmp_path / f"{qtype.name}.gguf", base, tokenizer, qtype=qtype)
    model = load_gguf_model(path, device="cpu", dtype=torch.bfloat16, quantization="int4-g32")
    down = model.layers[0].feed_forward.w2
    assert isinstance(down.scheme, Int4Weights) and down.weight.dtype == torch.uint8
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    want = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(down.out_features, -1)
    got = down.scheme.dequantize(down.weight, down.weight_scale, torch.float32)
    # the codes are the file's; only the block scale and zero are rounded to the kernel's bf16
    assert (got - want).abs().max() <= 2**-7 * want.abs().max()
    dense = load_gguf_model(path, device="cpu", dtype=torch.float32)
    x = torch.randint(10, 500, (1, 16))
    with torch.no_grad():
        a, b = model(x).float(), dense(x)
    assert float((a - b).norm() / b.norm()) < 0.05  # bf16 activations on the same 4-bit weights


def test_a_q4_gguf_runs_int4_on_the_cpu_by_default(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "q.gguf", int4_sized(tokenizer, attention="causal"), tokenizer, qtype=QT.Q4_1)
    auto = unmask.load(path, device="cpu")
    assert auto.config.quantization == "int4-g32" and auto.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert unmask.load(path, device="cpu", quantize="none").config.quantization is None
    f32 = write_gguf(tmp_path / "f.gguf", int4_sized(tokenizer, attention="causal"), tokenizer)
    assert unmask.load(f32, device="cpu").config.quantization is None  # only 4-bit files stay 4-bit


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_verify_is_ar_token_for_token_with_int4_weights_in_bf16(tokenizer, cache):
    base = sharpen(int4_sized(tokenizer, attention="causal"))
    model = adapted(base)
    base_q = quantize_model(copy.deepcopy(base), "int4-g32").to(torch.bfloat16)
    model_q = quantize_model(model, "int4-g32").to(torch.bfloat16)
    prompt = tokenizer.encode("def parse(line):\n    return line.split(line)\n\ndef parse(line):\n    return")
    want = ar_generate(base_q, prompt, max_new_tokens=40, stop_at_eos=False).tokens
    options = DecodeOptions(max_new_tokens=40, block_length=8, policy="verify", cache=cache, early_stop=False)
    got = Engine(model_q).generate(prompt, options)
    assert got.tokens == want
    assert got.steps < 40


@pytest.mark.parametrize("name", ["int8", "int4-g32"])
def test_a_tied_table_is_stored_once_as_int8_and_the_head_is_the_table(tokenizer, tmp_path, name):
    from safetensors import safe_open

    from unmask.model.checkpoints import load_model, save_model
    from unmask.model.quantize import QuantizedEmbedding

    dense = int4_sized(tokenizer, tie_embeddings=True).eval()
    model = quantize_model(copy.deepcopy(dense), name)
    table, head = model.tok_embeddings, model.output
    assert isinstance(table, QuantizedEmbedding) and table.weight.dtype == torch.int8
    assert head.table is table and not dict(head.named_buffers())  # one table: the head holds nothing of its own
    ids = torch.randint(10, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(table(ids), dense.tok_embeddings(ids), atol=dense.tok_embeddings.weight.abs().max() / 127)
        want = dense(ids)
        assert float((model(ids) - want).norm() / want.norm()) < 0.1
    save_model(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert not any(k.startswith("output.") for k in stored)
    assert stored["tok_embeddings.weight"] == torch.int8 and stored["tok_embeddings.weight_scale"] == torch.float32
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    assert loaded.output.table is loaded.tok_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_folder_with_a_float_table_and_its_own_quantized_head_still_loads(tokenizer, tmp_path):
    """Quantized folders written before tied tables were stored int8: the float table is quantized at load."""
    from safetensors.torch import load_file, save_file

    from unmask.model.checkpoints import load_model, save_model

    dense = int4_sized(tokenizer, tie_embeddings=True).eval()
    model = quantize_model(copy.deepcopy(dense), "int8")
    save_model(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["tok_embeddings.weight"] = dense.tok_embeddings.weight.detach().clone()
    del state["tok_embeddings.weight_scale"]
    state["output.weight"], state["output.weight_scale"] = scheme_named("int8").quantize(dense.output.weight.detach())
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(10, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_tied_q4_gguf_caches_a_folder_no_larger_than_the_file(tmp_path, tokenizer):
    from unmask.model.gguf import cached_folder

    base = int4_sized(tokenizer, attention="causal", tie_embeddings=True)
    table = base.tok_embeddings.weight.detach().numpy()
    path = write_gguf(tmp_path / "q.gguf", base, tokenizer, qtype=QT.Q4_1,  # llama.cpp's layout: a Q8_0 table
                      raw={"token_embd.weight": (gguf.quants.quantize(table, QT.Q8_0), QT.Q8_0)})
    folder = cached_folder(path, cache_dir=tmp_path / "cache", quantization="int4-g32")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert weights <= path.stat().st_size
    model = load_gguf_model(path, device="cpu", dtype=torch.bfloat16, quantization="int4-g32")
    assert model.tok_embeddings.weight.dtype == torch.int8 and model.output.table is model.tok_embeddings


def test_a_table_head_first_used_under_inference_mode_serves_calls_with_gradients(tokenizer):
    model = quantize_model(int4_sized(tokenizer, tie_embeddings=True).eval(), "int4-g32")
    ids = torch.randint(10, tokenizer.vocab_size, (1, 8))
    with torch.inference_mode():
        first = model(ids)
    again = model(ids)  # parameters track gradients here: the bf16 copy must not be an inference tensor
    assert torch.equal(again.detach(), first)
