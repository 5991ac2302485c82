"""Published checkpoint layouts load into our Transformer and compute what the published code computes.

Each reference forward below is written from the published architecture (LLaDA's OLMo llama block, Qwen2 for
Dream and Fast-dLLM v2, Qwen3 for SDAR/TraDo), in plain PyTorch on the *published* tensor names, independent of
unmask's model code.
Mutation tests load the same folders with a deliberately wrong mapping and check the comparison catches it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import unmask
from engine_helpers import sharpen
from published_checkpoints import llada_checkpoint, qwen2_checkpoint, read_raw_config, sdar_checkpoint
from unmask.decoding.options import DecodeOptions
from unmask.model import weights
from unmask.model.checkpoints import CheckpointError, load_model, read_config
from unmask.model.config import shape_config
from unmask.model.families import published
from unmask.model.transformer import Transformer

ATOL = 1e-4


# --- independent reference forwards ---------------------------------------------------------------
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(T, hd, theta):
    """Published HF/OLMo tables: emb = cat(freqs, freqs); q' = q cos + rotate_half(q) sin."""
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention(x, wq, wk, wv, wo, n_heads, n_kv, theta, allowed, bq=None, bk=None, bv=None, head_dim=None,
              q_norm=None, k_norm=None, eps=None):
    B, T, D = x.shape
    hd = head_dim or D // n_heads
    q = x @ wq.T + (0 if bq is None else bq)
    k = x @ wk.T + (0 if bk is None else bk)
    v = x @ wv.T + (0 if bv is None else bv)
    q, k, v = q.view(B, T, n_heads, hd), k.view(B, T, n_kv, hd), v.view(B, T, n_kv, hd)
    if q_norm is not None:  # Qwen3: RMSNorm over each head's head_dim features, before RoPE
        q, k = rms(q, q_norm, eps), rms(k, k_norm, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = rope_tables(T, hd, theta)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    # repeat_kv: query head h reads kv head h // (n_heads / n_kv)
    k = k[:, :, None].expand(B, n_kv, n_heads // n_kv, T, hd).reshape(B, n_heads, T, hd)
    v = v[:, :, None].expand(B, n_kv, n_heads // n_kv, T, hd).reshape(B, n_heads, T, hd)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, T, n_heads * hd) @ wo.T


def llada_reference(t, cfg, ids):
    """LLaDA (OLMo LLaDALlamaBlock): bidirectional, x + attn(attn_norm(x)); ff_out(silu(ff_proj(h)) * up_proj(h))."""
    p = "model.transformer."
    T = ids.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool)
    eps = cfg["rms_norm_eps"]
    x = t[p + "wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        h = rms(x, t[b + "attn_norm.weight"], eps)
        x = x + attention(h, t[b + "q_proj.weight"], t[b + "k_proj.weight"], t[b + "v_proj.weight"],
                          t[b + "attn_out.weight"], cfg["n_heads"], cfg["n_kv_heads"], cfg["rope_theta"], allowed)
        h = rms(x, t[b + "ff_norm.weight"], eps)
        x = x + (torch.nn.functional.silu(h @ t[b + "ff_proj.weight"].T) * (h @ t[b + "up_proj.weight"].T)) @ t[b + "ff_out.weight"].T
    x = rms(x, t[p + "ln_f.weight"], eps)
    head = t[p + "wte.weight"] if cfg["weight_tying"] else t[p + "ff_out.weight"]
    return x @ head.T


def qwen_decoder(t, cfg, ids, allowed, qwen3=False):
    """Unshifted logits of a Qwen2 decoder (q/k/v biases) or, with `qwen3`, a Qwen3 one (no biases; q_norm/k_norm;
    head_dim from config.json), with GQA and the attention pattern `allowed` [T, T]."""
    eps = cfg["rms_norm_eps"]
    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        a = b + "self_attn."
        if qwen3:
            extra = dict(head_dim=cfg["head_dim"], q_norm=t[a + "q_norm.weight"], k_norm=t[a + "k_norm.weight"], eps=eps)
        else:
            extra = dict(bq=t[a + "q_proj.bias"], bk=t[a + "k_proj.bias"], bv=t[a + "v_proj.bias"])
        h = rms(x, t[b + "input_layernorm.weight"], eps)
        x = x + attention(h, t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"],
                          t[a + "o_proj.weight"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                          cfg["rope_theta"], allowed, **extra)
        h = rms(x, t[b + "post_attention_layernorm.weight"], eps)
        m = b + "mlp."
        x = x + (torch.nn.functional.silu(h @ t[m + "gate_proj.weight"].T) * (h @ t[m + "up_proj.weight"].T)) @ t[m + "down_proj.weight"].T
    x = rms(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def qwen2_reference(t, cfg, ids, block_size=None):
    """Qwen2 decoder with q/k/v biases and GQA; Dream/Fast-dLLM read token i from output i-1 (the shift)."""
    T = ids.shape[1]
    i_idx = torch.arange(T)
    if block_size is None:
        allowed = torch.ones(T, T, dtype=torch.bool)
    else:  # Fast-dLLM v2 eval mask: q_block >= kv_block
        allowed = (i_idx[:, None] // block_size) >= (i_idx[None, :] // block_size)
    logits = qwen_decoder(t, cfg, ids, allowed)
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def sdar_reference(t, cfg, ids, block_length):
    """SDAR/TraDo (modeling_sdar.py): Qwen3 decoder under generate.py's mask, tril over blocks repeated block_length
    times along both axes; output i predicts token i (no shift)."""
    T = ids.shape[1]
    n = -(-T // block_length)
    blocks = torch.tril(torch.ones(n, n, dtype=torch.bool))
    allowed = blocks.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[:T, :T]
    return qwen_decoder(t, cfg, ids, allowed, qwen3=True)


def _ids(vocab, T=21, B=2, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _ours(path, ids):
    model = load_model(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return model(ids)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _with_family(monkeypatch, family):
    """Register `family` in place of the published one of the same name (for mutation tests)."""
    fams = [family if f.name == family.name else f for f in published.FAMILIES]
    monkeypatch.setattr(published, "FAMILIES", fams)


def _block_checkpoint(path, family):
    """A tiny block-diffusion checkpoint: (config.json, its reference forward, model block, logits shifted?).
    Fast-dLLM v2 with bd_size 8; SDAR without block_size, as released, so the published default 4 applies."""
    if family == "block_qwen":
        cfg, t = qwen2_checkpoint(path, kind="fast_dllm", bd_size=8)
        return cfg, lambda ids: qwen2_reference(t, cfg, ids, block_size=8), 8, True
    cfg, t = sdar_checkpoint(path)
    return cfg, lambda ids: sdar_reference(t, cfg, ids, block_length=4), 4, False


# --- logits match the published architecture ------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads,weight_tying", [(4, False), (2, True)])
def test_llada_layout_matches_reference(tmp_path, n_kv_heads, weight_tying):
    cfg, t = llada_checkpoint(tmp_path / "llada", n_kv_heads=n_kv_heads, weight_tying=weight_tying)
    assert len(set(json.loads((tmp_path / "llada" / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3
    ids = _ids(cfg["vocab_size"])
    ours = _ours(tmp_path / "llada", ids)
    assert ours.shape == (2, 21, cfg["embedding_size"])  # embedding_size rows, not vocab_size
    assert _max_diff(ours, llada_reference(t, cfg, ids)) < ATOL


@pytest.mark.parametrize("tie,store_tied_head", [(False, False), (True, False), (True, True)])
def test_dream_layout_matches_reference(tmp_path, tie, store_tied_head):
    cfg, t = qwen2_checkpoint(tmp_path / "dream", kind="dream", tie=tie, store_tied_head=store_tied_head)
    ids = _ids(cfg["vocab_size"])
    assert _max_diff(_ours(tmp_path / "dream", ids), qwen2_reference(t, cfg, ids)) < ATOL


@pytest.mark.parametrize("family", ["block_qwen", "sdar"])
def test_block_layout_matches_reference(tmp_path, family):
    cfg, reference, block, shift = _block_checkpoint(tmp_path / "m", family)
    ids = _ids(cfg["vocab_size"])
    ours = _ours(tmp_path / "m", ids)
    assert _max_diff(ours, reference(ids)) < ATOL
    # block-causal: logits of the first block do not depend on later blocks (a shift reads output `block` from i-1)
    keep = block + shift
    changed = ids.clone()
    changed[:, block:] = (changed[:, block:] + 1) % cfg["vocab_size"]
    again = _ours(tmp_path / "m", changed)
    assert _max_diff(again[:, :keep], ours[:, :keep]) < ATOL
    assert _max_diff(again[:, keep:], ours[:, keep:]) > 1e-2


@pytest.mark.parametrize("tie", [False, True])
def test_sdar_layout_matches_reference(tmp_path, tie):
    """head_dim 16 with 4 heads on a 48-wide model (Qwen3 decouples them), 2 kv heads, q_norm/k_norm, 3 shards."""
    cfg, t = sdar_checkpoint(tmp_path / "sdar", tie=tie)
    assert cfg["num_attention_heads"] * cfg["head_dim"] != cfg["hidden_size"]
    assert len(set(json.loads((tmp_path / "sdar" / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3
    ids = _ids(cfg["vocab_size"])
    model = load_model(tmp_path / "sdar", device="cpu", dtype=torch.float32)
    c = model.config
    assert (c.family, c.head_dim, c.qk_norm, c.attn_bias, c.logits_shift, c.block_size) == ("sdar", 16, True, False, False, 4)
    with torch.no_grad():
        assert _max_diff(model(ids), sdar_reference(t, cfg, ids, block_length=4)) < ATOL


@pytest.mark.parametrize("family", ["block_qwen", "sdar"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_block_checkpoint_decodes_the_same_with_a_cache(tmp_path, family, cache):
    """unmask.load + generate on a published block layout: block-causal caches are exact, so cached decoding gives
    the uncached tokens, and decode blocks (block_length 8) never cross the model's blocks (SDAR's are 4)."""
    _, _, block, _ = _block_checkpoint(tmp_path / "m", family)
    pipe = unmask.load(tmp_path / "m", device="cpu")
    sharpen(pipe.model)
    options = DecodeOptions(max_new_tokens=16, block_length=8, threshold=0.9, early_stop=False)
    plain = pipe.generate("def f(x):", options.replace(cache="none"))
    cached = pipe.generate("def f(x):", options.replace(cache=cache))
    assert cached.tokens == plain.tokens and len(plain.tokens) == 16
    assert len(set(plain.tokens)) > 2  # context-sensitive, not a constant
    assert len(plain.steps_per_block) >= 16 // block


# --- a wrong mapping must fail the comparison ------------------------------------------------------
def _swap(name_map, a, b):
    m = dict(name_map)
    m[a], m[b] = name_map[b], name_map[a]
    return m


def test_mutation_swapped_gate_up_is_caught(tmp_path, monkeypatch):
    cfg, t = llada_checkpoint(tmp_path / "llada")
    ids = _ids(cfg["vocab_size"])
    assert _max_diff(_ours(tmp_path / "llada", ids), llada_reference(t, cfg, ids)) < ATOL
    swapped = _swap(published.LLADA_NAMES, "model.transformer.blocks.{}.ff_proj.weight",
                    "model.transformer.blocks.{}.up_proj.weight")
    _with_family(monkeypatch, dataclasses.replace(published.LLADA, name_map=swapped))
    assert _max_diff(_ours(tmp_path / "llada", ids), llada_reference(t, cfg, ids)) > 1e-2

    cfg, t = qwen2_checkpoint(tmp_path / "dream", kind="dream")
    ids = _ids(cfg["vocab_size"])
    swapped = _swap(published.QWEN2_NAMES, "model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight")
    _with_family(monkeypatch, dataclasses.replace(published.DREAM, name_map=swapped))
    assert _max_diff(_ours(tmp_path / "dream", ids), qwen2_reference(t, cfg, ids)) > 1e-2


@pytest.mark.parametrize("family", ["dream", "sdar"])
def test_mutation_wrong_shift_is_caught(tmp_path, monkeypatch, family):
    """Dream loaded without its shift, or SDAR (unshifted) with one, must fail the comparison."""
    if family == "dream":
        cfg, t = qwen2_checkpoint(tmp_path / "m", kind="dream")
        reference, fam = (lambda ids: qwen2_reference(t, cfg, ids)), published.DREAM
    else:
        cfg, t = sdar_checkpoint(tmp_path / "m")
        reference, fam = (lambda ids: sdar_reference(t, cfg, ids, block_length=4)), published.SDAR
    ids = _ids(cfg["vocab_size"])

    def flipped(raw):
        config = fam.to_config(raw)
        return dataclasses.replace(config, logits_shift=not config.logits_shift)

    _with_family(monkeypatch, dataclasses.replace(fam, to_config=flipped))
    ours, ref = _ours(tmp_path / "m", ids), reference(ids)
    assert _max_diff(ours, ref) > 1e-2
    # ... and it is exactly the shift that is wrong: unshifted output i equals shifted output i+1
    unshifted, shifted = (ours, ref) if family == "dream" else (ref, ours)
    assert _max_diff(unshifted[:, :-1], shifted[:, 1:]) < ATOL


def test_mutation_swapped_qk_norm_is_caught(tmp_path, monkeypatch):
    cfg, t = sdar_checkpoint(tmp_path / "sdar")
    ids = _ids(cfg["vocab_size"])
    swapped = _swap(published.QWEN3_NAMES, "model.layers.{}.self_attn.q_norm.weight",
                    "model.layers.{}.self_attn.k_norm.weight")
    _with_family(monkeypatch, dataclasses.replace(published.SDAR, name_map=swapped))
    assert _max_diff(_ours(tmp_path / "sdar", ids), sdar_reference(t, cfg, ids, block_length=4)) > 1e-2


def test_mutation_wrong_rope_style_is_caught(tmp_path, monkeypatch):
    """Loading q/k as if the checkpoint used interleaved (GPT-J / Meta) RoPE pairs must change the logits."""
    cfg, t = llada_checkpoint(tmp_path / "llada")
    ids = _ids(cfg["vocab_size"])
    hd = cfg["d_model"] // cfg["n_heads"]

    def interleaved_to_half(name, w):  # the Meta -> HF permutation, applied where it does not belong
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = w.shape[0] // hd
            return w.view(heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        return w

    _with_family(monkeypatch, dataclasses.replace(published.LLADA, transform=interleaved_to_half))
    assert _max_diff(_ours(tmp_path / "llada", ids), llada_reference(t, cfg, ids)) > 1e-2


@pytest.mark.parametrize("family", ["block_qwen", "sdar"])
@pytest.mark.parametrize("mutation", ["bidirectional", "block_size"])
def test_mutation_wrong_block_mask_is_caught(tmp_path, monkeypatch, family, mutation):
    cfg, reference, block, _ = _block_checkpoint(tmp_path / "m", family)
    ids = _ids(cfg["vocab_size"])
    change = {"attention": "bidirectional"} if mutation == "bidirectional" else {"block_size": 2 * block}
    fam = published.BLOCK_QWEN if family == "block_qwen" else published.SDAR

    def wrong(raw):
        return dataclasses.replace(fam.to_config(raw), **change)

    _with_family(monkeypatch, dataclasses.replace(fam, to_config=wrong))
    assert _max_diff(_ours(tmp_path / "m", ids), reference(ids)) > 1e-2


# --- configs: published keys at full size ---------------------------------------------------------
def test_published_full_size_configs_map_to_the_known_shapes(tmp_path):
    llada_8b = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 4096, "n_heads": 32,
                "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4, "vocab_size": 126464,
                "embedding_size": 126464, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 4096,
                "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081, "weight_tying": False,
                "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "include_bias": False,
                "include_qkv_bias": False, "alibi": False, "rope": True}
    dream_7b = {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 3584, "intermediate_size": 18944,
                "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064,
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "mask_token_id": 151666, "eos_token_id": 151643, "pad_token_id": 151643, "bos_token_id": 151643,
                "tie_word_embeddings": False, "rope_scaling": None, "use_sliding_window": False, "hidden_act": "silu"}
    fast_dllm = {**dream_7b, "model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"],
                 "bd_size": 32, "eos_token_id": 151645}
    del fast_dllm["mask_token_id"]
    for raw, shape, family in ((llada_8b, "llada-8b", "llada"), (dream_7b, "dream-7b", "dream")):
        (tmp_path / family).mkdir()
        (tmp_path / family / "config.json").write_text(json.dumps(raw))
        config, fam, _ = read_config(tmp_path / family)
        expect = shape_config(shape)
        assert fam.name == family
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "rope_theta", "norm_eps",
                    "attn_bias", "logits_shift", "mask_id", "eos_id", "pad_id", "attention", "tie_embeddings"):
            assert getattr(config, key) == getattr(expect, key), key
        assert config.num_params() == expect.num_params()
    (tmp_path / "fd").mkdir()
    (tmp_path / "fd" / "config.json").write_text(json.dumps(fast_dllm))
    config, fam, _ = read_config(tmp_path / "fd")
    assert (fam.name, config.attention, config.block_size, config.logits_shift) == ("block_qwen", "block_causal", 32, True)
    assert (config.mask_id, config.eos_id) == (151665, 151645)  # |<MASK>| when config.json does not say


# JetLM/SDAR-4B-Chat's config.json as released (no block_size, no mask_token_id)
SDAR_4B = {"architectures": ["SDARForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "attn_implementation": "flex_attention", "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig",
           "AutoModel": "modeling_sdar.SDARModel", "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
           "bos_token_id": 151643, "debug": False, "eos_token_id": 151643, "ep_size": 1, "fuse_cross_entropy": True,
           "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
           "intermediate_size": 9728, "max_position_embeddings": 32768, "max_window_layers": 36, "micro_forward": False,
           "model_type": "sdar", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
           "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "skip_checkpoint": False,
           "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False, "use_sliding_window": False,
           "vocab_size": 151936}


def test_sdar_full_size_config(tmp_path):
    config, fam, _ = read_raw_config(tmp_path, SDAR_4B)
    assert fam.name == "sdar"
    assert config == shape_config("sdar-4b")
    assert (config.head_dim, config.block_size, config.logits_shift, config.qk_norm, config.attn_bias) == \
        (128, 4, False, True, False)
    with torch.device("meta"):
        model = Transformer(config)
    assert model.layers[0].attention.wq.weight.shape == (32 * 128, 2560)  # 4096 != hidden_size
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    # a fine-tuned folder (TraDo, SFT runs) writes the keys the training code reads: they win
    config, _, _ = read_raw_config(tmp_path, {**SDAR_4B, "block_size": 16, "mask_token_id": 151670})
    assert (config.block_size, config.mask_id) == (16, 151670)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "sdar_moe", "architectures": ["SDARMoeForCausalLM"], "num_experts": 128,
      "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False}, "norm_topk_prob=False"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
])
def test_unsupported_sdar_configs_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        read_raw_config(tmp_path, {**SDAR_4B, **change})


def test_sdar_head_dim_absent_takes_the_published_default(tmp_path):
    """configuration_sdar's head_dim defaults to 128, not hidden_size / heads: a tiny folder without the key must
    then disagree with its 16-wide heads, by name, rather than load as 12-wide heads."""
    sdar_checkpoint(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["head_dim"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\(64, 48\).*\(512, 48\)"):
        unmask.load(tmp_path / "m", device="cpu")


def test_qwen3_layout_in_a_qwen2_family_is_refused(tmp_path):
    """A Qwen3-based Fast-dLLM port (not an official release): its q_norm/k_norm and own head_dim do not fit the
    Qwen2 layout, so the config is refused by name instead of failing later on a tensor."""
    qwen2_checkpoint(tmp_path / "m", kind="fast_dllm")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(model_type="Fast_dLLM_Qwen3", architectures=["Fast_dLLM_Qwen3ForCausalLM"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="Fast_dLLM_Qwen3.*Qwen3-based"):
        unmask.load(tmp_path / "m", device="cpu")


@pytest.mark.parametrize("key,value", [("alibi", True), ("block_type", "sequential"), ("layer_norm_type", "default"),
                                       ("include_bias", True), ("activation_type", "swiglu")])
def test_unsupported_llada_options_are_refused_by_name(tmp_path, key, value):
    llada_checkpoint(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=key):
        unmask.load(tmp_path / "m", device="cpu")


def test_unsupported_qwen_rope_scaling_is_refused(tmp_path):
    qwen2_checkpoint(tmp_path / "m", kind="dream")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_scaling"):
        unmask.load(tmp_path / "m", device="cpu")


# --- loader errors fire for the published layouts ---------------------------------------------------
def test_missing_shard_of_a_published_layout(tmp_path):
    llada_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*model-00002-of-00003"):
        unmask.load(tmp_path / "m", device="cpu")


def test_shape_mismatch_of_a_published_layout(tmp_path):
    qwen2_checkpoint(tmp_path / "m", kind="dream")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.(gate|up|down)_proj.weight.*does not match|does not match.*mlp"):
        unmask.load(tmp_path / "m", device="cpu")


def test_unknown_tensor_in_a_published_layout(tmp_path):
    llada_checkpoint(tmp_path / "m", n_shards=1)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.blocks.0.att_proj.weight"] = "model-00001-of-00001.safetensors"
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="att_proj"):
        unmask.load(tmp_path / "m", device="cpu")


def test_not_enough_memory_for_a_published_layout(tmp_path, monkeypatch):
    llada_checkpoint(tmp_path / "m")
    monkeypatch.setattr(weights.os, "sysconf", lambda name: 16)  # 16 pages of 16 bytes free
    with pytest.raises(CheckpointError, match="not enough memory"):
        unmask.load(tmp_path / "m", device="cpu")


# --- tokenizer and chat template of the checkpoint ---------------------------------------------------
def test_llada_tokenizer_ids_and_template(tmp_path):
    cfg, _ = llada_checkpoint(tmp_path / "m")
    pipe = unmask.load(tmp_path / "m", device="cpu")
    tok = pipe.tokenizer
    assert tok.mask_id == cfg["mask_token_id"] == tok.token_to_id("<|mdm_mask|>")
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_id == tok.token_to_id("<|startoftext|>")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there "}])
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.token_to_id("<|eot_id|>") in ids  # special tokens encode as one id


@pytest.mark.parametrize("kind,mask", [("dream", "<|mask|>"), ("fast_dllm", "|<MASK>|"), ("sdar", "<|MASK|>")])
def test_qwen_tokenizer_ids_and_template(tmp_path, kind, mask):
    # SDAR ships its template as chat_template.jinja
    sdar_checkpoint(tmp_path / "m") if kind == "sdar" else qwen2_checkpoint(tmp_path / "m", kind=kind)
    pipe = unmask.load(tmp_path / "m", device="cpu")
    tok = pipe.tokenizer
    assert tok.mask_id == pipe.config.mask_id == tok.token_to_id(mask)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_published_layout_loads_straight_into_bf16(tmp_path):
    cfg, t = qwen2_checkpoint(tmp_path / "dream", kind="dream")
    model = load_model(tmp_path / "dream", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        ours = model(ids).float()
    ref = qwen2_reference(t, cfg, ids)
    # bf16 rounding only: the bf16 logits still pick the reference's top token almost everywhere
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_dream_slow_tokenizer_files_load_like_the_fast_tokenizer(tmp_path):
    """Dream-v0 folders ship vocab.json + merges.txt for their slow DreamTokenizer (Qwen2's split, NFC), no
    tokenizer.json: the loader builds the same tokenizer, with the added tokens at their published ids."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    from unmask.tokenizer import Tokenizer

    # PRETOKENIZE_REGEX of Dream's tokenization_dream.py (= Qwen2Tokenizer's), written out here independently
    split = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
             r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
    qwen2_checkpoint(tmp_path / "slow", kind="dream", slow_tokenizer=True)
    assert not (tmp_path / "slow" / "tokenizer.json").exists()
    pipe = unmask.load(tmp_path / "slow", device="cpu")
    tok = pipe.tokenizer
    assert tok.mask_id == pipe.config.mask_id == tok.token_to_id("<|mask|>")
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    # reference: the same BPE with the pre-tokenizer and normalizer of Qwen2.5's published tokenizer.json
    qwen2_checkpoint(tmp_path / "fast", kind="dream")
    ref = Tokenizer.from_dir(tmp_path / "fast")
    ref.hf.normalizer = normalizers.NFC()
    ref.hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    text = tok.apply_chat_template([{"role": "user", "content": "def f(x):\n    return x * 12345  # café\r\n"}])
    text += "Cafe\u0301 it's 3.14<|mask|><|mask|>\n\n\tdone<|endoftext|>"
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode("\u00e9") == tok.encode("e\u0301")  # NFC, as DreamTokenizer.prepare_for_tokenization
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    assert tok.decode(tok.encode(text)) == tok.decode(ref.encode(text))
    assert tok.special.keys() >= {"<|im_start|>", "<|im_end|>", "<|mask|>"}


def test_slow_tokenizer_files_of_another_class_are_refused(tmp_path):
    qwen2_checkpoint(tmp_path / "m", kind="dream", slow_tokenizer=True)
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "LlamaTokenizer"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(unmask.errors.UnmaskError, match="LlamaTokenizer"):
        unmask.load(tmp_path / "m", device="cpu")


def test_qwen_rope_parameters_of_transformers_5_configs(tmp_path):
    """transformers >= 5 writes rope_theta inside rope_parameters (MIGRATION_GUIDE_V5: "all parameters for configuring
    the rotary embedding are now stored under rope_parameters"): the theta must be read from there, a scaled
    rope_type refused, and rope_type "default" (also as rope_scaling) accepted as plain RoPE."""
    cfg, t = qwen2_checkpoint(tmp_path / "m", kind="dream")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["rope_theta"] != 10000.0
    ids = _ids(cfg["vocab_size"])
    v5 = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(v5))
    assert _max_diff(_ours(tmp_path / "m", ids), qwen2_reference(t, cfg, ids)) < ATOL
    (tmp_path / "m" / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"type": "default"}}))
    assert _max_diff(_ours(tmp_path / "m", ids), qwen2_reference(t, cfg, ids)) < ATOL
    v5["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": raw["rope_theta"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(v5))
    with pytest.raises(CheckpointError, match="rope_parameters"):
        unmask.load(tmp_path / "m", device="cpu")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    qwen2_checkpoint(tmp_path / "m", kind="dream")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.embed_tokens.weight"] = "model-00003-of-00003.safetensors"  # it is in shard 1
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    for dtype in (None, "float32"):
        with pytest.raises(CheckpointError, match="model-00003-of-00003.*embed_tokens"):
            unmask.load(tmp_path / "m", device="cpu", dtype=dtype)


def test_unreadable_tokenizer_config(tmp_path):
    qwen2_checkpoint(tmp_path / "m", kind="dream")
    (tmp_path / "m" / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}",')
    with pytest.raises(unmask.errors.UnmaskError, match="tokenizer_config.json is not valid JSON"):
        unmask.load(tmp_path / "m", device="cpu")


@pytest.mark.parametrize("key", ["layer_norm_type", "rope", "block_type", "activation_type"])
def test_absent_llada_keys_take_the_published_defaults(tmp_path, key):
    """LLaDAConfig fills absent keys from configuration_llada.ModelConfig, whose defaults are OLMo's (LayerNorm,
    no RoPE, sequential block, swiglu), not the 8B checkpoints' values: absent means unsupported, not 'as 8B'.
    (Without layer_norm_type the weights even load cleanly into RMSNorm: silently different logits.)"""
    llada_checkpoint(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg[key]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"{key}=.*published default"):
        unmask.load(tmp_path / "m", device="cpu")


def test_llada_block_groups_are_refused_and_absent_weight_tying_ties(tmp_path):
    llada_checkpoint(tmp_path / "m", weight_tying=True)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "block_group_size": 2}))
    with pytest.raises(CheckpointError, match="block_group_size=2"):
        unmask.load(tmp_path / "m", device="cpu")
    del cfg["weight_tying"]  # configuration_llada's default is a tied head
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert unmask.load(tmp_path / "m", device="cpu").config.tie_embeddings


def test_a_family_module_that_fails_to_import_fails_loudly(monkeypatch):
    """A broken family file is its own ImportError, not every published layout turning "unsupported"."""
    import importlib
    import importlib.abc
    import sys

    class BrokenFamily(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "unmask.model.families.published":
                raise ModuleNotFoundError("No module named 'a_missing_dependency'")
            return None

    monkeypatch.setattr(sys, "meta_path", [BrokenFamily(), *sys.meta_path])
    for name in [n for n in sys.modules if n.startswith("unmask.model.families")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    with pytest.raises(ModuleNotFoundError, match="a_missing_dependency"):
        importlib.import_module("unmask.model.families")
