"""Mixture-of-experts layers and the LLaDA-MoE checkpoint family.

The reference forward below is written from inclusionAI's published LLaDA-MoE modeling code (OLMoE-style decoder,
LLaDAMoESparseMoeBlock) in plain PyTorch on the *published* tensor names. Its routing is computed densely (every
expert on every token, a [tokens, experts] weight matrix from a sort), independent of unmask's sparse dispatch.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import unmask
from engine_helpers import sharpen
from published_checkpoints import llada2_checkpoint, llada_moe_checkpoint, read_raw_config, sdar_checkpoint
from test_families import _ids, _max_diff, _with_family, attention, rms
from unmask.decoding.options import DecodeOptions
from unmask.diffusion.objective import masked_diffusion_loss
from unmask.model.checkpoints import CheckpointError, load_model, read_config, save_model
from unmask.model.config import ConfigError, ModelConfig, shape_config
from unmask.model.families import published
from unmask.model.transformer import MoEFeedForward, Transformer

ATOL = 1e-4


# --- independent reference --------------------------------------------------------------------------
def swiglu(h, gate, up, down):
    return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T


def routing_matrix(h, router, k, renormalize=False):
    """[tokens, experts] weights: softmax over the experts of each token, zero outside its k largest."""
    probs = (h @ router.T).float().softmax(dim=-1)
    ranked = probs.sort(dim=-1, descending=True)
    kth = ranked.values[:, k - 1 : k]
    w = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return w / w.sum(-1, keepdim=True) if renormalize else w


def sparse_moe(h, t, prefix, cfg, renormalize=False):
    B, T, D = h.shape
    flat = h.reshape(-1, D)
    w = routing_matrix(flat, t[prefix + "gate.weight"], cfg["num_experts_per_tok"], renormalize)
    out = torch.zeros_like(flat)
    for e in range(cfg["num_experts"]):
        ex = f"{prefix}experts.{e}."
        out = out + w[:, e : e + 1] * swiglu(flat, t[ex + "gate_proj.weight"], t[ex + "up_proj.weight"],
                                              t[ex + "down_proj.weight"])
    return out.view(B, T, D)


def llada_moe_reference(t, cfg, ids, renormalize=False):
    """LLaDAMoEModelLM: bidirectional OLMoE-style decoder, per-head q/k RMSNorm before RoPE, sparse MoE MLP
    (+ shared expert on the same input), dense mlp where moe_layer_freq is 0, untied lm_head, no logit shift."""
    eps, T = cfg["rms_norm_eps"], ids.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool)
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        b, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        h = rms(x, t[b + "input_layernorm.weight"], eps)
        x = x + attention(h, t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"],
                          t[a + "o_proj.weight"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                          cfg["rope_theta"], allowed, head_dim=hd, q_norm=t[a + "q_norm.weight"],
                          k_norm=t[a + "k_norm.weight"], eps=eps)
        h = rms(x, t[b + "post_attention_layernorm.weight"], eps)
        m = b + "mlp."
        if cfg["moe_layer_freq"][i] == 0:
            y = swiglu(h, t[m + "gate_proj.weight"], t[m + "up_proj.weight"], t[m + "down_proj.weight"])
        else:
            y = sparse_moe(h, t, m, cfg, renormalize)
            if cfg["shared_expert_intermediate_size"]:
                s = b + "shared_expert."
                y = y + swiglu(h, t[s + "gate_proj.weight"], t[s + "up_proj.weight"], t[s + "down_proj.weight"])
        x = x + y
    x = rms(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def _ours(path, ids):
    model = load_model(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return model(ids)


# --- the published layout computes what the published code computes ----------------------------------
@pytest.mark.parametrize("kw", [
    {},
    {"tie": True, "n_kv_heads": 2},
    {"shared_hidden": 40, "moe_layer_freq": [0, 1, 1], "n_layers": 3},
])
def test_llada_moe_layout_matches_reference(tmp_path, kw):
    cfg, t = llada_moe_checkpoint(tmp_path / "m", **kw)
    assert cfg["model_type"] == "llada"  # as released: recognised by architecture and expert keys
    assert len(set(json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"].values())) == 3
    model = load_model(tmp_path / "m", device="cpu", dtype=torch.float32)
    c = model.config
    assert (c.family, c.n_experts, c.n_experts_per_token, c.expert_hidden, c.qk_norm, c.attention, c.logits_shift,
            c.router_renormalize) == ("llada_moe", 8, 3, 32, True, "bidirectional", False, False)
    assert c.first_dense_layers == (1 if kw.get("moe_layer_freq") else 0)
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (2, 21, cfg["vocab_size"])
    assert _max_diff(ours, llada_moe_reference(t, cfg, ids)) < ATOL
    assert c.num_params() == sum(p.numel() for p in model.parameters())  # parameters() counts a tied head once


def test_llada_moe_reference_is_sensitive_to_the_routing(tmp_path):
    """Guards the mutation tests: renormalising the kept weights changes this checkpoint's logits a lot."""
    cfg, t = llada_moe_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"])
    assert _max_diff(llada_moe_reference(t, cfg, ids), llada_moe_reference(t, cfg, ids, renormalize=True)) > 1e-2


# --- a wrong mapping or wrong routing must fail the comparison --------------------------------------------
def test_mutation_swapped_expert_gate_up_is_caught(tmp_path, monkeypatch):
    cfg, t = llada_moe_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"])
    names = dict(published.LLADA_MOE_NAMES)
    g, u = "model.layers.{}.mlp.experts.{}.gate_proj.weight", "model.layers.{}.mlp.experts.{}.up_proj.weight"
    names[g], names[u] = names[u], names[g]
    _with_family(monkeypatch, dataclasses.replace(published.LLADA_MOE, name_map=names))
    assert _max_diff(_ours(tmp_path / "m", ids), llada_moe_reference(t, cfg, ids)) > 1e-2


def test_mutation_swapped_expert_indices_is_caught(tmp_path, monkeypatch):
    """Expert e's weights loaded as expert e+1: the router then sends tokens to the wrong experts."""
    cfg, t = llada_moe_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"])
    n = cfg["num_experts"]

    def shifted_name(ckpt_name):
        parts = ckpt_name.split(".")
        if "experts" in parts:
            j = parts.index("experts") + 1
            parts[j] = str((int(parts[j]) + 1) % n)
            ckpt_name = ".".join(parts)
        return published.LLADA_MOE.our_name(ckpt_name)

    class Shifted(type(published.LLADA_MOE)):
        def our_name(self, ckpt_name):
            return shifted_name(ckpt_name)

    fam = Shifted(**{f.name: getattr(published.LLADA_MOE, f.name) for f in dataclasses.fields(published.LLADA_MOE)})
    _with_family(monkeypatch, fam)
    assert _max_diff(_ours(tmp_path / "m", ids), llada_moe_reference(t, cfg, ids)) > 1e-2


def test_mutation_renormalised_top_k_is_caught(tmp_path, monkeypatch):
    cfg, t = llada_moe_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"])

    def renormalised(raw):
        return dataclasses.replace(published.llada_moe_config(raw), router_renormalize=True)

    _with_family(monkeypatch, dataclasses.replace(published.LLADA_MOE, to_config=renormalised))
    ours = _ours(tmp_path / "m", ids)
    assert _max_diff(ours, llada_moe_reference(t, cfg, ids)) > 1e-2
    assert _max_diff(ours, llada_moe_reference(t, cfg, ids, renormalize=True)) < ATOL  # the flag does what it says


def test_mutation_router_softmax_over_the_wrong_axis_is_caught(tmp_path, monkeypatch):
    cfg, t = llada_moe_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"])

    def route_over_tokens(self, x):
        probs = self.router(x).float().softmax(dim=0)  # over tokens instead of experts
        weights, experts = probs.topk(self.k, dim=-1)
        return weights.to(x.dtype), experts

    monkeypatch.setattr(MoEFeedForward, "route", route_over_tokens)
    assert _max_diff(_ours(tmp_path / "m", ids), llada_moe_reference(t, cfg, ids)) > 1e-2


# --- the MoE layer itself --------------------------------------------------------------------------------
def _moe(seed=0, **overrides):
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=128, n_experts=6, n_experts_per_token=2,
                expert_hidden=24, mask_id=0, eos_id=1, pad_id=1)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**base, **overrides})).init_weights(seed).eval()


def _dense_moe(layer: MoEFeedForward, x):
    """All experts on all tokens, weighted by the reference routing matrix."""
    flat = x.reshape(-1, x.shape[-1])
    w = routing_matrix(flat, layer.router.weight, layer.k, layer.renormalize).to(x.dtype)
    out = sum(w[:, e : e + 1] * ex(flat) for e, ex in enumerate(layer.experts))
    if hasattr(layer, "shared"):
        out = out + layer.shared(flat)
    return out.view(x.shape)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(1, 1), (1, 32), (3, 7), (2, 50)])
def test_sparse_dispatch_equals_dense_mixture(dtype, atol, shape):
    layer = _moe(shared_expert_hidden=16, router_renormalize=shape[1] == 7).layers[0].feed_forward.to(dtype)
    x = torch.randn(*shape, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ours = layer(x)
        assert ours.dtype == dtype
        assert _max_diff(ours.float(), _dense_moe(layer, x).float()) < atol


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_static_dense_dispatch_equals_the_reference_mixture(dtype, atol):
    """The path a compiled decoding step takes (every expert, zero weights off the top-k)."""
    layer = _moe(router_renormalize=True).layers[0].feed_forward.to(dtype)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        weights, experts = layer.route(x)
        dense = layer.dispatch_dense(x, weights, experts)
        assert _max_diff(dense.float(), _dense_moe(layer, x[None])[0].float()) < atol
        assert _max_diff(dense.float(), layer.dispatch_sparse(x, weights, experts).float()) < atol


@pytest.mark.slow
def test_compiled_moe_decoding_matches_eager_without_recompiling(caplog):
    """Traced, the per-expert counts would be guarded on and recompile the layer every step (until dynamo's
    recompile limit gives up); the compiled path is static instead."""
    from unmask.decoding.engine import Engine

    torch._dynamo.reset()
    model = _moe(attention="block_causal", block_size=8, first_dense_layers=1, shared_expert_hidden=16)
    ids = torch.randint(2, 64, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    options = DecodeOptions(max_new_tokens=16, block_length=8, threshold=0.6)
    eager = Engine(model).generate(ids, options)
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        compiled = Engine(model, compile=True).generate(ids, options)
    assert compiled.tokens == eager.tokens
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]


def test_moe_logits_do_not_depend_on_the_batch():
    model = _moe()
    ids = torch.randint(2, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = model(ids)
        for b in range(3):
            assert _max_diff(model(ids[b : b + 1])[0], batched[b]) < 1e-5


def test_moe_model_trains_one_step():
    model = _moe(shared_expert_hidden=16, first_dense_layers=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x0 = torch.randint(2, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    before = model.layers[1].feed_forward.router.weight.detach().clone()
    loss = masked_diffusion_loss(model, x0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    loss.backward()
    moe = model.layers[1].feed_forward
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert model.layers[0].feed_forward.w1.weight.grad.abs().sum() > 0  # the leading dense layer
    used = [e for e in moe.experts if e.w1.weight.grad is not None and e.w1.weight.grad.abs().sum() > 0]
    assert 2 <= len(used) <= len(moe.experts)
    opt.step()
    assert not torch.equal(before, moe.router.weight)


def test_moe_config_round_trips_and_dense_configs_are_unchanged(tmp_path):
    cfg = _moe(shared_expert_hidden=16, first_dense_layers=1).config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in ModelConfig().to_dict().items()
           if k not in ("n_experts", "n_experts_per_token", "expert_hidden", "shared_expert_hidden",
                        "first_dense_layers", "router_renormalize")}
    dense = ModelConfig.from_dict(old)  # a config.json written before the MoE keys existed
    assert dense.n_experts == 0 and not any(dense.is_moe_layer(i) for i in range(dense.n_layers))
    with torch.device("meta"):
        model = Transformer(dense)
    assert not any("experts" in n or "router" in n for n in model.state_dict())


def test_native_save_load_round_trip_of_a_moe_model(tmp_path):
    model = _moe(shared_expert_hidden=16, first_dense_layers=1)
    save_model(model, tmp_path / "m", max_shard_bytes=20_000)
    loaded = load_model(tmp_path / "m", device="cpu", dtype=torch.float32)
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _max_diff(loaded(ids), model(ids)) == 0


def test_ckpt_names_write_the_published_layout(tmp_path):
    """Our model written under Family.ckpt_names is exactly the published tensor set and loads back unchanged."""
    cfg, t = llada_moe_checkpoint(tmp_path / "pub", shared_hidden=40, moe_layer_freq=[0, 1, 1], n_layers=3)
    model = load_model(tmp_path / "pub", device="cpu", dtype=torch.float32)
    names = published.LLADA_MOE.ckpt_names(model.config)
    assert set(names.values()) == set(t)
    state = model.state_dict()
    rewritten = {names[ours]: state[ours] for ours in names}
    from published_checkpoints import write_shards

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    write_shards(out, rewritten, n_shards=2)
    ids = _ids(cfg["vocab_size"])
    assert _max_diff(_ours(out, ids), llada_moe_reference(t, cfg, ids)) < ATOL


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_llada_moe_decodes_the_same_with_a_refreshed_cache(tmp_path, cache):
    """unmask.load + generate on the published layout: with the cache refreshed every step (bidirectional models
    need that for exactness), cached decoding runs the MoE on windows of cached slots and must give the uncached
    tokens; a stale cache (the default) is an approximation and is allowed to differ."""
    llada_moe_checkpoint(tmp_path / "m")
    pipe = unmask.load(tmp_path / "m", device="cpu")
    sharpen(pipe.model)
    options = DecodeOptions(max_new_tokens=16, block_length=8, threshold=0.9, early_stop=False)
    plain = pipe.generate("def f(x):", options.replace(cache="none"))
    cached = pipe.generate("def f(x):", options.replace(cache=cache, cache_refresh=1))
    assert cached.tokens == plain.tokens and cached.nfe == plain.nfe and len(plain.tokens) == 16
    assert len(set(plain.tokens)) > 2  # context-sensitive, not a constant


def test_llada_moe_loads_in_bf16(tmp_path):
    cfg, t = llada_moe_checkpoint(tmp_path / "m")
    model = load_model(tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        ours = model(ids)
    assert ours.dtype == torch.bfloat16
    ref = llada_moe_reference(t, cfg, ids)
    # bf16 may flip a near-tie in routing for a token or two; the bulk must agree
    close = ((ours.float() - ref).abs() < 0.1 * ref.abs().max()).float().mean()
    assert close > 0.95


# --- configs ---------------------------------------------------------------------------------------
# LLaDA-MoE-7B-A1B's shape as documented by the sources listed in published.py (not a copy of its config.json)
LLADA_MOE_7B = {"architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_size": 2048,
                "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
                "num_experts_per_tok": 8, "expert_intermediate_size": 1024, "dense_intermediate_size": 8192,
                "shared_expert_intermediate_size": None, "moe_layer_freq": [1] * 16, "qk_layernorm": True,
                "rope_theta": 50000.0, "rope_scaling": None, "partial_rotary_factor": 1.0, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "vocab_size": 157184, "tie_word_embeddings": False, "attention_bias": False,
                "clip_qkv": None, "hidden_act": "silu", "moe_router_score_function": "softmax",
                "moe_router_enable_expert_bias": False, "routed_scaling_factor": 1, "norm_topk_prob": None,
                "eos_token_id": 156892, "pad_token_id": 156892, "mask_token_id": 156895}


def test_llada_moe_7b_config_maps_to_the_bench_shape(tmp_path):
    config, fam, _ = read_raw_config(tmp_path, LLADA_MOE_7B)
    assert fam.name == "llada_moe"
    assert config == shape_config("llada-moe-7b")
    with torch.device("meta"):
        model = Transformer(config)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert abs(config.num_params() - 7.36e9) < 0.01e9  # "7.36B total" (a secondary source's meta-load count)
    # the model card's "1.4B activated": attention + 8 of 64 experts + routers, plus the LM head
    assert 1.35e9 < config.num_params(include_embeddings=False, active=True) + config.vocab_size * config.dim < 1.45e9


def test_llada_moe_mask_id_equal_to_eos_means_unset(tmp_path):
    config, _, _ = read_raw_config(tmp_path, {**LLADA_MOE_7B, "mask_token_id": 156892})
    assert (config.mask_id, config.eos_id) == (156895, 156892)
    config, _, _ = read_raw_config(tmp_path, {k: v for k, v in LLADA_MOE_7B.items() if k != "mask_token_id"})
    assert config.mask_id == 156895
    config, _, _ = read_raw_config(tmp_path, {**LLADA_MOE_7B, "mask_token_id": 156000})
    assert config.mask_id == 156000  # an explicit, distinct id wins


@pytest.mark.parametrize("change,message", [
    ({"moe_router_score_function": "sigmoid"}, "moe_router_score_function='sigmoid'"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias=True"),
    ({"routed_scaling_factor": 2.5}, "routed_scaling_factor=2.5"),
    ({"router_num_group": 8}, "router_num_group=8"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"head_dim": 64}, "head_dim=64"),
    ({"moe_layer_freq": [1, 0] * 8}, "moe_layer_freq"),
    ({"qk_layernorm": None}, "qk_layernorm"),
])
def test_unsupported_llada_moe_configs_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        read_raw_config(tmp_path, {**LLADA_MOE_7B, **change})


def test_moe_families_we_cannot_compute_are_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="norm_topk_prob"):
        read_raw_config(tmp_path, {"model_type": "sdar_moe", "architectures": ["SDARMoeForCausalLM"], "num_experts": 128})


def test_dense_llada_is_still_the_llada_family(tmp_path):
    """LLaDA-MoE shares model_type "llada"; the dense LLaDA-8B config must still load as LLaDA."""
    raw = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 64, "n_heads": 4, "n_layers": 2,
           "vocab_size": 126464, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True}
    _, fam, _ = read_raw_config(tmp_path, raw)
    assert fam.name == "llada"


@pytest.mark.parametrize("bad,msg", [
    (dict(n_experts=4, n_experts_per_token=5, expert_hidden=8), "n_experts_per_token"),
    (dict(n_experts=4, n_experts_per_token=2, expert_hidden=0), "expert_hidden"),
    (dict(n_experts_per_token=2), "need n_experts"),
])
def test_bad_moe_configs_are_rejected(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**bad)


# --- SDAR-MoE (SDAR-30B-A3B): SDAR attention, block-causal, Qwen3-MoE experts with renormalised top-k -------------
def sdar_moe_reference(t, cfg, ids, block_length=4, renormalize=True):
    """JetEngine's SDARMoe forward: Qwen3 attention (q_norm/k_norm, own head_dim) under the block-causal mask,
    softmax -> top-k -> divided by their sum, no shared expert, unshifted logits."""
    eps, T = cfg["rms_norm_eps"], ids.shape[1]
    n = -(-T // block_length)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)).repeat_interleave(block_length, 0)
    allowed = allowed.repeat_interleave(block_length, 1)[:T, :T]
    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        b, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        h = rms(x, t[b + "input_layernorm.weight"], eps)
        x = x + attention(h, t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"],
                          t[a + "o_proj.weight"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                          cfg["rope_theta"], allowed, head_dim=cfg["head_dim"], q_norm=t[a + "q_norm.weight"],
                          k_norm=t[a + "k_norm.weight"], eps=eps)
        h = rms(x, t[b + "post_attention_layernorm.weight"], eps)
        x = x + sparse_moe(h, t, b + "mlp.", cfg, renormalize)
    x = rms(x, t["model.norm.weight"], eps)
    return x @ (t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]).T


def test_sdar_moe_layout_matches_reference(tmp_path):
    cfg, t = sdar_checkpoint(tmp_path / "m", moe=(8, 3, 24))
    model = load_model(tmp_path / "m", device="cpu", dtype=torch.float32)
    c = model.config
    assert (c.family, c.n_experts, c.n_experts_per_token, c.expert_hidden, c.router_renormalize, c.attention,
            c.block_size, c.logits_shift, c.head_dim) == ("sdar_moe", 8, 3, 24, True, "block_causal", 4, False, 16)
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        ours = model(ids)
    assert _max_diff(ours, sdar_moe_reference(t, cfg, ids)) < ATOL
    assert _max_diff(ours, sdar_moe_reference(t, cfg, ids, renormalize=False)) > 1e-2  # renormalising matters here


def assert_cache_is_exact(folder, block_length: int) -> None:
    """Block-causal caches are exact: cached decoding of the (sharpened) model gives the uncached tokens."""
    pipe = unmask.load(folder, device="cpu")
    sharpen(pipe.model)
    options = DecodeOptions(max_new_tokens=16, block_length=block_length, threshold=0.9, early_stop=False)
    plain = pipe.generate("def f(x):", options.replace(cache="none"))
    for cache in ("prefix", "dual"):
        assert pipe.generate("def f(x):", options.replace(cache=cache)).tokens == plain.tokens
    assert len(set(plain.tokens)) > 2


def test_sdar_moe_decodes_the_same_with_a_cache(tmp_path):
    sdar_checkpoint(tmp_path / "m", moe=(8, 3, 24))
    assert_cache_is_exact(tmp_path / "m", block_length=8)


@pytest.mark.parametrize("change,message", [
    ({"norm_topk_prob": False}, "norm_topk_prob=False"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"mlp_only_layers": [0]}, "mlp_only_layers"),
])
def test_unsupported_sdar_moe_configs_are_refused_by_name(tmp_path, change, message):
    cfg, _ = sdar_checkpoint(tmp_path / "m", moe=(8, 3, 24))
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        read_config(tmp_path / "m")


# --- LLaDA2.0 / 2.1 (llada2_moe): fused qkv, partial RoPE, block-causal, sigmoid + bias + grouped top-k router -----
def llada2_reference(t, cfg, ids, block_length=32, score="sigmoid", bias_in_weights=False, groups=True,
                     rotary_factor=None, renormalize=True, scaling=None):
    """LLaDA2MoeModelLM (modeling_llada2_moe.py) in plain PyTorch on the published names. Attention: fused
    query_key_value viewed as [n_heads + 2 n_kv, head_dim] rows, per-head query/key_layernorm, rotate-half RoPE on
    the first head_dim * partial_rotary_factor features (frequencies over that width), block-causal mask
    (tril over blocks of `block_length`, as generate() builds it), dense. LLaDA2MoeGate, one token at a time:
    sigmoid(logits) in float32, + expert_bias to choose, groups scored by their two best biased scores, top
    topk_group groups, top-k experts among them, weights = unbiased scores / their sum (k > 1) * scaling.
    The keyword arguments switch single facts off, to show each one matters."""
    eps, T = cfg["rms_norm_eps"], ids.shape[1]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rd = int(hd * (cfg["partial_rotary_factor"] if rotary_factor is None else rotary_factor))
    n = -(-T // block_length)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)).repeat_interleave(block_length, 0)
    allowed = allowed.repeat_interleave(block_length, 1)[:T, :T]
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos().float(), torch.cat([freqs, freqs], -1).sin().float()

    def rope(x):
        r, rest = x[..., :rd], x[..., rd:]
        half = rd // 2
        rotated = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
        return torch.cat([r * cos + rotated * sin, rest], dim=-1)

    def gate(h, p):
        logits = h.float() @ t[p + "weight"].float().T
        scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
        E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
        G, TG = cfg["n_group"], cfg["topk_group"]
        weights = torch.zeros_like(scores)
        for row in range(scores.shape[0]):
            s = scores[row]
            choice = s + t[p + "expert_bias"]
            allowed_e = list(range(E))
            if groups:
                per = E // G
                gscore = [sorted(choice[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(G)]
                best = sorted(range(G), key=lambda g: -sum(gscore[g]))[:TG]
                allowed_e = [e for e in range(E) if e // per in best]
            chosen = sorted(allowed_e, key=lambda e: -choice[e].item())[:k]
            w = (choice if bias_in_weights else s)[chosen]
            if renormalize and k > 1:
                w = w / w.sum()
            weights[row, chosen] = w * (cfg["routed_scaling_factor"] if scaling is None else scaling)
        return weights

    x = t["model.word_embeddings.weight"][ids]
    B = x.shape[0]
    for i in range(cfg["num_hidden_layers"]):
        b, a = f"model.layers.{i}.", f"model.layers.{i}.attention."
        h = rms(x, t[b + "input_layernorm.weight"], eps)
        qkv = h @ t[a + "query_key_value.weight"].T + t.get(a + "query_key_value.bias", 0)
        qkv = qkv.view(B, T, H + 2 * KV, hd)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + KV], qkv[:, :, H + KV:]
        q, k = rms(q, t[a + "query_layernorm.weight"], eps), rms(k, t[a + "key_layernorm.weight"], eps)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        att = ((q @ k.transpose(-1, -2)) / hd ** 0.5).masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, H * hd) @ t[a + "dense.weight"].T
        h = rms(x, t[b + "post_attention_layernorm.weight"], eps)
        m = b + "mlp."
        if i < cfg["first_k_dense_replace"]:
            y = swiglu(h, t[m + "gate_proj.weight"], t[m + "up_proj.weight"], t[m + "down_proj.weight"])
        else:
            flat = h.reshape(-1, h.shape[-1])
            w = gate(flat, m + "gate.")
            y = torch.zeros_like(flat)
            for e in range(cfg["num_experts"]):
                ex = f"{m}experts.{e}."
                y = y + w[:, e:e + 1] * swiglu(flat, t[ex + "gate_proj.weight"], t[ex + "up_proj.weight"],
                                               t[ex + "down_proj.weight"])
            y = y.view_as(h)
            if cfg["num_shared_experts"]:
                s = m + "shared_experts."
                y = y + swiglu(h, t[s + "gate_proj.weight"], t[s + "up_proj.weight"], t[s + "down_proj.weight"])
        x = x + y
    x = rms(x, t["model.norm.weight"], eps)
    return x @ t["lm_head.weight"].T


LLADA2_T = 40  # two blocks of 32 with a partial second one: the block-causal mask matters


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "n_kv_heads": 4, "first_dense": 0, "n_shared": 0}])
def test_llada2_layout_matches_reference(tmp_path, kw):
    cfg, t = llada2_checkpoint(tmp_path / "m", **kw)
    model = load_model(tmp_path / "m", device="cpu", dtype=torch.float32)
    c = model.config
    assert (c.family, c.attention, c.block_size, c.logits_shift, c.rotary_dim, c.router_score, c.router_expert_bias,
            c.router_groups, c.router_topk_groups, c.routed_scaling, c.router_renormalize) == (
        "llada2", "block_causal", 32, False, 8, "sigmoid", True, 4, 2, 2.5, True)
    ids = _ids(cfg["vocab_size"], T=LLADA2_T)
    with torch.no_grad():
        ours = model(ids)
    assert _max_diff(ours, llada2_reference(t, cfg, ids)) < ATOL


@pytest.mark.parametrize("change", [
    dict(score="softmax"), dict(bias_in_weights=True), dict(groups=False), dict(rotary_factor=1.0),
    dict(renormalize=False), dict(scaling=1.0), dict(block_length=LLADA2_T),
])
def test_llada2_reference_is_sensitive_to_each_fact(tmp_path, change):
    """Every fact the loader encodes changes the output of this checkpoint, so the match above pins each one."""
    cfg, t = llada2_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"], T=LLADA2_T)
    assert _max_diff(llada2_reference(t, cfg, ids), llada2_reference(t, cfg, ids, **change)) > 1e-2


@pytest.mark.parametrize("mutation", [
    dict(router_score="softmax"), dict(router_groups=0, router_topk_groups=0), dict(rotary_dim=None),
    dict(routed_scaling=1.0), dict(router_renormalize=False), dict(attention="bidirectional"),
])
def test_llada2_config_mutations_are_caught(tmp_path, monkeypatch, mutation):
    cfg, t = llada2_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"], T=LLADA2_T)

    def mutated(raw):
        return dataclasses.replace(published.llada2_config(raw), **mutation)

    _with_family(monkeypatch, dataclasses.replace(published.LLADA2, to_config=mutated))
    assert _max_diff(_ours(tmp_path / "m", ids), llada2_reference(t, cfg, ids)) > 1e-2


def test_llada2_mutation_bias_in_the_weights_is_caught(tmp_path, monkeypatch):
    cfg, t = llada2_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"], T=LLADA2_T)
    route = MoEFeedForward.route

    def biased_weights(self, x):
        w, e = route(self, x)
        return w + self.router_bias[e].to(w.dtype) * self.config.routed_scaling, e

    monkeypatch.setattr(MoEFeedForward, "route", biased_weights)
    assert _max_diff(_ours(tmp_path / "m", ids), llada2_reference(t, cfg, ids)) > 1e-2


def test_llada2_mutation_swapped_k_v_split_is_caught(tmp_path, monkeypatch):
    cfg, t = llada2_checkpoint(tmp_path / "m")
    ids = _ids(cfg["vocab_size"], T=LLADA2_T)

    def swapped(name, tensor, config):
        parts = published.llada2_split(name, tensor, config)
        if ".attention.wqkv." in name:
            k, v = name.replace("wqkv", "wk"), name.replace("wqkv", "wv")
            parts[k], parts[v] = parts[v], parts[k]
        return parts

    _with_family(monkeypatch, dataclasses.replace(published.LLADA2, split=swapped))
    assert _max_diff(_ours(tmp_path / "m", ids), llada2_reference(t, cfg, ids)) > 1e-2


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_llada2_sparse_and_dense_dispatch_agree(dtype, atol):
    model = _moe(router_score="sigmoid", router_expert_bias=True, router_groups=4, router_topk_groups=2,
                 routed_scaling=2.5, router_renormalize=True, n_experts=8, n_experts_per_token=3).to(dtype)
    layer = model.layers[0].feed_forward
    with torch.no_grad():
        layer.router_bias.copy_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(3)))
        x = torch.randn(37, layer.router.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
        w, e = layer.route(x)
        per = 8 // 4
        for row in e.tolist():  # every chosen expert lies in at most topk_groups groups
            assert len({x // per for x in row}) <= 2
        assert _max_diff(layer.dispatch_sparse(x, w, e).float(), layer.dispatch_dense(x, w, e).float()) < atol


def test_llada2_decodes_the_same_with_a_cache(tmp_path):
    llada2_checkpoint(tmp_path / "m", seed=1)  # a seed whose sharpened random model does not repeat one token
    assert_cache_is_exact(tmp_path / "m", block_length=32)


LLADA2_MINI = {  # inclusionAI/LLaDA2.0-mini config.json values as quoted by xLLM's loader test and mlx-lm ports
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "first_k_dense_replace": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5120, "max_position_embeddings": 32768,
    "moe_intermediate_size": 512, "moe_router_enable_expert_bias": True, "n_group": 8, "norm_head": False,
    "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8,
    "num_hidden_layers": 20, "num_key_value_heads": 4, "num_shared_experts": 1, "pad_token_id": 156892,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06, "rope_theta": 600000, "routed_scaling_factor": 2.5,
    "score_function": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "use_bias": False,
    "use_qk_norm": True, "use_qkv_bias": False, "vocab_size": 157184,
}


def test_llada2_mini_config_maps_to_the_bench_shape(tmp_path):
    config, fam, _ = read_raw_config(tmp_path, LLADA2_MINI)
    assert fam.name == "llada2"
    assert config == shape_config("llada2-mini")
    assert (config.mask_id, config.eos_id, config.rotary_dim) == (156895, 156892, 64)
    # "16B total, 1.4B activated" (model card): within a few percent (num_params skips the 256 bias buffers)
    assert 15.5e9 < config.num_params() < 16.6e9


@pytest.mark.parametrize("change,message", [
    ({"use_bias": True}, "use_bias=True"),
    ({"score_function": "softmax"}, "score_function='softmax'"),
    ({"norm_topk_prob": False}, "norm_topk_prob=False"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"norm_head": True}, "norm_head=True"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"partial_rotary_factor": 0.01}, "partial_rotary_factor=0.01"),
    ({"n_group": 3}, "n_group=3"),
    ({"topk_group": 9}, "topk_group=9"),
    ({"first_k_dense_replace": 20}, "first_k_dense_replace=20"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_llada2_configs_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        read_raw_config(tmp_path, {**LLADA2_MINI, **change})


def test_llada2_use_bias_absent_means_the_published_default_true(tmp_path):
    with pytest.raises(CheckpointError, match="use_bias=True, the published default"):
        read_raw_config(tmp_path, {k: v for k, v in LLADA2_MINI.items() if k != "use_bias"})


def test_configs_without_the_routing_keys_are_unchanged():
    new = ("router_score", "router_expert_bias", "router_groups", "router_topk_groups", "routed_scaling",
           "rotary_dim")
    moe = _moe(shared_expert_hidden=16).config
    old = {k: v for k, v in moe.to_dict().items() if k not in new}
    again = ModelConfig.from_dict(old)
    assert again == moe and (again.router_score, again.routed_scaling, again.rotary_dim) == ("softmax", 1.0, None)
    cfg = _moe(router_score="sigmoid", router_expert_bias=True, router_groups=2, router_topk_groups=1,
               routed_scaling=2.5, rotary_dim=8).config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="rotary_dim"):
        ModelConfig(dim=64, n_heads=4, rotary_dim=6 + 1)
    with pytest.raises(ConfigError, match="router_groups"):
        ModelConfig(dim=64, n_heads=4, n_experts=6, n_experts_per_token=2, expert_hidden=8, router_groups=4,
                    router_topk_groups=1)


def test_native_save_load_round_trip_of_a_llada2_model(tmp_path):
    llada2_checkpoint(tmp_path / "pub")
    model = load_model(tmp_path / "pub", device="cpu", dtype=torch.float32)
    save_model(model, tmp_path / "m", max_shard_bytes=50_000)
    loaded = load_model(tmp_path / "m", device="cpu", dtype=torch.float32)
    ids = _ids(model.config.vocab_size, T=LLADA2_T)
    with torch.no_grad():
        assert _max_diff(loaded(ids), model(ids)) == 0
