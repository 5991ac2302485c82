"""Tiny random checkpoints in the published layouts (LLaDA, Dream, Fast-dLLM v2 block Qwen, SDAR/TraDo block
Qwen3, LLaDA-MoE), written the way the real folders are: the published config.json keys, the published tensor names, safetensors shards with
model.safetensors.index.json, tokenizer.json with the family's special tokens and tokenizer_config.json with
its chat template. Used by the family, chat, HumanEval and lm-eval tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from conftest import stdlib_texts
from unmask.model.checkpoints import read_config

LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
FAST_DLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"]
SDAR_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|MASK|>"]
LLADA_MOE_SPECIALS = ["<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"]
# a stand-in in the shape of LLaDA-MoE-Instruct's role markup (<role>HUMAN</role>...<|role_end|>), not its exact text
LLADA_MOE_TEMPLATE = (
    "{% for message in messages %}{{ '<role>' + message['role'] | upper + '</role>' + message['content'] + "
    "'<|role_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)

# LLaDA-8B-Instruct's template (Llama-3 style headers, BOS before the first turn)
LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5 / Dream template (without the tool-calling branches)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_TOKENIZERS: dict[tuple[str, ...], HFTokenizer] = {}


def family_tokenizer(specials: list[str], vocab_size: int = 300) -> HFTokenizer:
    """A byte-level BPE (like the published ones) whose added special tokens are the family's."""
    key = tuple(specials)
    if key not in _TOKENIZERS:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(stdlib_texts(20), trainer=trainer)
        _TOKENIZERS[key] = hf
    return HFTokenizer.from_str(_TOKENIZERS[key].to_str())


def write_tokenizer(path: Path, hf: HFTokenizer, template: str, bos: str | None, eos: str, pad: str,
                    slow: bool = False, jinja_file: bool = False) -> None:
    """tokenizer.json + tokenizer_config.json; with `slow`, Dream-v0's files instead: vocab.json + merges.txt and a
    tokenizer_config.json naming its slow DreamTokenizer (the published Dream folders have no tokenizer.json).
    `jinja_file`: the chat template in chat_template.jinja (as the SDAR folders ship it), not tokenizer_config.json."""
    path.mkdir(parents=True, exist_ok=True)
    added = {str(hf.token_to_id(t.content)): {"content": t.content, "lstrip": False, "normalized": False,
                                              "rstrip": False, "single_word": False, "special": True}
             for t in hf.get_added_tokens_decoder().values()}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, "chat_template": template,
           "bos_token": bos, "eos_token": eos, "pad_token": pad, "model_max_length": 4096}
    if jinja_file:
        (path / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    if slow:
        hf.model.save(str(path))  # vocab.json + merges.txt
        cfg.update(tokenizer_class="DreamTokenizer", errors="replace", split_special_tokens=False,
                   auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    else:
        hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def write_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor], n_shards: int) -> None:
    """config.json + the tensors in `n_shards` safetensors shards with their index: a published layout."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(path, tensors, n_shards)


def write_shards(path: Path, tensors: dict[str, torch.Tensor], n_shards: int = 3) -> None:
    """Split tensors over `n_shards` files named like HF's, with model.safetensors.index.json."""
    names = list(tensors)
    per = math.ceil(len(names) / n_shards)
    weight_map = {}
    for i in range(n_shards):
        chunk = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _linear(gen, out_f, in_f):
    return torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)


def _norm(gen, n):
    # not all ones, so a norm mapped to the wrong place changes the output
    return 1.0 + 0.2 * torch.randn(n, generator=gen)


def llada_checkpoint(path: Path, *, d=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden=160, weight_tying=False,
                     seed=0, n_shards=3) -> tuple[dict, dict[str, torch.Tensor]]:
    """LLaDA-8B's layout at toy width. Returns (config.json dict, tensors by published name)."""
    hf = family_tokenizer(LLADA_SPECIALS)
    vocab = hf.get_vocab_size()
    emb = 128 * math.ceil((vocab + 1) / 128)  # OLMo pads the embedding beyond vocab_size
    eos = hf.token_to_id("<|endoftext|>")
    config = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d,
        "embedding_dropout": 0.0, "embedding_size": emb, "eos_token_id": eos, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": hf.token_to_id("<|mdm_mask|>"), "max_sequence_length": 256,
        "mlp_hidden_size": hidden, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": n_heads, "n_kv_heads": n_kv_heads, "n_layers": n_layers, "pad_token_id": eos,
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-5, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3",
        "use_cache": False, "vocab_size": vocab, "weight_tying": weight_tying,
    }
    gen = torch.Generator().manual_seed(seed)
    hd = d // n_heads
    t = {"model.transformer.wte.weight": torch.randn(emb, d, generator=gen)}
    for i in range(n_layers):
        p = f"model.transformer.blocks.{i}."
        t[p + "attn_norm.weight"] = _norm(gen, d)
        t[p + "q_proj.weight"] = _linear(gen, d, d)
        t[p + "k_proj.weight"] = _linear(gen, n_kv_heads * hd, d)
        t[p + "v_proj.weight"] = _linear(gen, n_kv_heads * hd, d)
        t[p + "attn_out.weight"] = _linear(gen, d, d)
        t[p + "ff_norm.weight"] = _norm(gen, d)
        t[p + "ff_proj.weight"] = _linear(gen, hidden, d)
        t[p + "up_proj.weight"] = _linear(gen, hidden, d)
        t[p + "ff_out.weight"] = _linear(gen, d, hidden)
    t["model.transformer.ln_f.weight"] = _norm(gen, d)
    if not weight_tying:
        t["model.transformer.ff_out.weight"] = _linear(gen, emb, d)
    write_checkpoint(path, config, t, n_shards)
    write_tokenizer(path, hf, LLADA_TEMPLATE, bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
    return config, t


def qwen_tensors(seed: int, *, vocab: int, d: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 hidden: int, tie: bool, store_tied_head: bool, qwen3: bool,
                 experts: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Random weights under the published Qwen names: Qwen2 (q/k/v biases) or Qwen3 (no biases; per-head q_norm and
    k_norm; head_dim need not be d / n_heads). `experts` (count, width): Qwen3-MoE's mlp.gate + mlp.experts.{e}.*
    in place of the dense mlp."""
    gen = torch.Generator().manual_seed(seed)
    q_out, kv_out = n_heads * head_dim, n_kv_heads * head_dim
    t = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=gen)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm(gen, d)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            t[p + f"self_attn.{name}.weight"] = _linear(gen, out, d)
            if not qwen3:
                t[p + f"self_attn.{name}.bias"] = 0.3 * torch.randn(out, generator=gen)
        t[p + "self_attn.o_proj.weight"] = _linear(gen, d, q_out)
        if qwen3:
            t[p + "self_attn.q_norm.weight"] = _norm(gen, head_dim)
            t[p + "self_attn.k_norm.weight"] = _norm(gen, head_dim)
        t[p + "post_attention_layernorm.weight"] = _norm(gen, d)
        if experts:
            n, width = experts
            t[p + "mlp.gate.weight"] = 3 * _linear(gen, n, d)
            for e in range(n):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = _linear(gen, width, d)
                t[p + f"mlp.experts.{e}.up_proj.weight"] = _linear(gen, width, d)
                t[p + f"mlp.experts.{e}.down_proj.weight"] = _linear(gen, d, width)
            continue
        t[p + "mlp.gate_proj.weight"] = _linear(gen, hidden, d)
        t[p + "mlp.up_proj.weight"] = _linear(gen, hidden, d)
        t[p + "mlp.down_proj.weight"] = _linear(gen, d, hidden)
    t["model.norm.weight"] = _norm(gen, d)
    if not tie:
        t["lm_head.weight"] = _linear(gen, vocab, d)
    elif store_tied_head:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    return t


def qwen2_checkpoint(path: Path, *, kind: str = "dream", d=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=160,
                     tie=False, store_tied_head=False, bd_size=8, seed=0, n_shards=3,
                     with_mask_id=True, slow_tokenizer=False) -> tuple[dict, dict[str, torch.Tensor]]:
    """Dream-v0 (kind="dream") or Fast-dLLM v2 (kind="fast_dllm") layout at toy width. `slow_tokenizer`: ship
    vocab.json + merges.txt as the published Dream-v0 folders do, instead of tokenizer.json."""
    specials = DREAM_SPECIALS if kind == "dream" else FAST_DLLM_SPECIALS
    hf = family_tokenizer(specials)
    vocab = 64 * math.ceil((hf.get_vocab_size() + 1) / 64)  # Qwen pads its vocabulary
    eos = hf.token_to_id("<|endoftext|>")
    mask = hf.token_to_id("<|mask|>" if kind == "dream" else "|<MASK>|")
    config = {
        "attention_dropout": 0.0, "bos_token_id": eos, "eos_token_id": eos, "hidden_act": "silu",
        "hidden_size": d, "initializer_range": 0.02, "intermediate_size": hidden, "max_position_embeddings": 512,
        "max_window_layers": n_layers, "num_attention_heads": n_heads, "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": tie, "torch_dtype": "float32",
        "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False, "vocab_size": vocab,
    }
    if kind == "dream":
        config.update({"architectures": ["DreamModel"], "model_type": "Dream", "mask_token_id": mask,
                       "pad_token_id": eos,
                       "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                                    "AutoModel": "modeling_dream.DreamModel"}})
    else:
        config.update({"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen",
                       "bd_size": bd_size, "eos_token_id": hf.token_to_id("<|im_end|>"),
                       "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                                    "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"}})
        if with_mask_id:
            config["mask_token_id"] = mask
    t = qwen_tensors(seed, vocab=vocab, d=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=d // n_heads, hidden=hidden, tie=tie, store_tied_head=store_tied_head, qwen3=False)
    write_checkpoint(path, config, t, n_shards)
    write_tokenizer(path, hf, QWEN_TEMPLATE, bos=None, eos="<|endoftext|>" if kind == "dream" else "<|im_end|>",
                    pad="<|endoftext|>", slow=slow_tokenizer)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.token_to_id("<|im_end|>"), eos]}))
    return config, t


def sdar_checkpoint(path: Path, *, d=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden=96, tie=False,
                    block_size=None, seed=0, n_shards=3, moe: tuple[int, int, int] | None = None
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """JetLM/SDAR-4B-Chat's layout at toy width (Qwen3: head_dim decoupled from d / n_heads, q_norm/k_norm), with the
    keys a fine-tuned SDAR/TraDo folder adds (mask_token_id; block_size when given: the released ones omit it)."""
    hf = family_tokenizer(SDAR_SPECIALS)
    vocab = 64 * math.ceil((hf.get_vocab_size() + 1) / 64)
    eos = hf.token_to_id("<|endoftext|>")
    config = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
        "bos_token_id": eos, "debug": False, "eos_token_id": eos, "ep_size": 1, "fuse_cross_entropy": True,
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": d, "initializer_range": 0.02,
        "intermediate_size": hidden, "mask_token_id": hf.token_to_id("<|MASK|>"), "max_position_embeddings": 512,
        "max_window_layers": n_layers, "micro_forward": False, "model_type": "sdar", "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers, "num_key_value_heads": n_kv_heads, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000, "skip_checkpoint": False, "sliding_window": None, "tie_word_embeddings": tie,
        "torch_dtype": "float32", "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False,
        "use_sliding_window": False, "vocab_size": vocab,
    }
    if block_size is not None:
        config["block_size"] = block_size
    if moe:  # (experts, top-k, expert width): SDAR-30B-A3B's Qwen3-MoE keys
        n, k, width = moe
        config.update(architectures=["SDARMoeForCausalLM"], model_type="sdar_moe", num_experts=n, num_experts_per_tok=k,
                      moe_intermediate_size=width, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      output_router_logits=False, router_aux_loss_coef=0.001)
        config["auto_map"] = {k_: v.replace("sdar.SDAR", "sdar_moe.SDARMoe") for k_, v in config["auto_map"].items()}
    t = qwen_tensors(seed, vocab=vocab, d=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=head_dim, hidden=hidden, tie=tie, store_tied_head=False, qwen3=True,
                     experts=(moe[0], moe[2]) if moe else None)
    write_checkpoint(path, config, t, n_shards)
    write_tokenizer(path, hf, QWEN_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>", jinja_file=True)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.token_to_id("<|im_end|>"), eos]}))
    return config, t


def llada_moe_checkpoint(path: Path, *, d=48, n_layers=2, n_heads=4, n_kv_heads=4, n_experts=8, top_k=3, expert_hidden=32,
                         shared_hidden=None, moe_layer_freq=None, dense_hidden=80, tie=False, seed=0, n_shards=3,
                         extra: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """inclusionAI/LLaDA-MoE-7B-A1B's layout at toy width: OLMoE-style names, per-head q_norm/k_norm, a router
    `mlp.gate` and experts `mlp.experts.{e}.{gate,up,down}_proj`; model_type "llada" as released, architectures
    LLaDAMoEModelLM. `shared_hidden` adds `shared_expert.*`; `moe_layer_freq` with leading zeros adds dense layers."""
    hf = family_tokenizer(LLADA_MOE_SPECIALS)
    vocab = 64 * math.ceil((hf.get_vocab_size() + 1) / 64)
    eos = hf.token_to_id("<|endoftext|>")
    freq = moe_layer_freq or [1] * n_layers
    config = {
        "architectures": ["LLaDAMoEModelLM"],
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig", "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None, "dense_intermediate_size": dense_hidden,
        "eos_token_id": eos, "expert_intermediate_size": expert_hidden, "hidden_act": "silu", "hidden_size": d,
        "initializer_range": 0.02, "mask_token_id": hf.token_to_id("<|mask|>"), "max_position_embeddings": 512,
        "model_type": "llada", "moe_layer_freq": freq, "moe_router_enable_expert_bias": False,
        "moe_router_score_function": "softmax", "norm_topk_prob": None, "num_attention_heads": n_heads,
        "num_experts": n_experts, "num_experts_per_tok": top_k, "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads, "output_router_logits": False, "pad_token_id": eos,
        "partial_rotary_factor": 1.0, "qk_layernorm": True, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "rope_theta": 50000.0, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01, "router_num_group": None,
        "router_topk_group": None, "shared_expert_intermediate_size": shared_hidden, "tie_word_embeddings": tie,
        "torch_dtype": "float32", "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab,
        **(extra or {}),
    }
    gen = torch.Generator().manual_seed(seed)
    hd = d // n_heads
    t = {"model.embed_tokens.weight": torch.randn(vocab, d, generator=gen)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm(gen, d)
        t[p + "self_attn.q_proj.weight"] = _linear(gen, n_heads * hd, d)
        t[p + "self_attn.k_proj.weight"] = _linear(gen, n_kv_heads * hd, d)
        t[p + "self_attn.v_proj.weight"] = _linear(gen, n_kv_heads * hd, d)
        t[p + "self_attn.o_proj.weight"] = _linear(gen, d, d)
        t[p + "self_attn.q_norm.weight"] = _norm(gen, hd)
        t[p + "self_attn.k_norm.weight"] = _norm(gen, hd)
        t[p + "post_attention_layernorm.weight"] = _norm(gen, d)
        if freq[i] == 0:
            t[p + "mlp.gate_proj.weight"] = _linear(gen, dense_hidden, d)
            t[p + "mlp.up_proj.weight"] = _linear(gen, dense_hidden, d)
            t[p + "mlp.down_proj.weight"] = _linear(gen, d, dense_hidden)
            continue
        t[p + "mlp.gate.weight"] = 3 * _linear(gen, n_experts, d)  # peaked enough that the top-k choice matters
        for e in range(n_experts):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = _linear(gen, expert_hidden, d)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = _linear(gen, expert_hidden, d)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = _linear(gen, d, expert_hidden)
        if shared_hidden:
            t[p + "shared_expert.gate_proj.weight"] = _linear(gen, shared_hidden, d)
            t[p + "shared_expert.up_proj.weight"] = _linear(gen, shared_hidden, d)
            t[p + "shared_expert.down_proj.weight"] = _linear(gen, d, shared_hidden)
    t["model.norm.weight"] = _norm(gen, d)
    if not tie:
        t["lm_head.weight"] = _linear(gen, vocab, d)
    write_checkpoint(path, config, t, n_shards)
    write_tokenizer(path, hf, LLADA_MOE_TEMPLATE, bos=None, eos="<|endoftext|>", pad="<|endoftext|>")
    return config, t


def llada2_checkpoint(path: Path, *, d=48, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=8, top_k=3,
                      expert_hidden=24, n_group=4, topk_group=2, n_shared=1, first_dense=1, dense_hidden=80,
                      qkv_bias=False, seed=0, n_shards=3, extra: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """inclusionAI/LLaDA2.0-mini's layout at toy width (model_type "llada2_moe", LLaDA2MoeModelLM): fused
    attention.query_key_value, attention.dense, query_layernorm/key_layernorm, model.word_embeddings, a sigmoid
    router mlp.gate with its expert_bias buffer, mlp.experts.{e}.*, mlp.shared_experts.* and dense leading layers.
    Config values follow the released config.json (partial_rotary_factor 0.5, n_group/topk_group,
    routed_scaling_factor 2.5, norm_topk_prob true, use_bias false), shrunk."""
    hf = family_tokenizer(LLADA_MOE_SPECIALS)
    vocab = 64 * math.ceil((hf.get_vocab_size() + 1) / 64)
    eos = hf.token_to_id("<|endoftext|>")
    config = {
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "attention_dropout": 0.0, "embedding_dropout": 0.0, "eos_token_id": eos, "first_k_dense_replace": first_dense,
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": d, "initializer_range": 0.02,
        "intermediate_size": dense_hidden, "mask_token_id": hf.token_to_id("<|mask|>"), "max_position_embeddings": 512,
        "max_window_layers": 28, "model_type": "llada2_moe", "moe_intermediate_size": expert_hidden,
        "moe_router_enable_expert_bias": True, "n_group": n_group, "norm_head": False, "norm_topk_prob": True,
        "num_attention_heads": n_heads, "num_experts": n_experts, "num_experts_per_tok": top_k,
        "num_hidden_layers": n_layers, "num_key_value_heads": n_kv_heads, "num_shared_experts": n_shared,
        "output_dropout": 0.0, "output_router_logits": False, "pad_token_id": eos, "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 600000, "routed_scaling_factor": 2.5,
        "score_function": "sigmoid", "tie_word_embeddings": False, "topk_group": topk_group, "torch_dtype": "float32",
        "use_bias": False, "use_cache": False, "use_qk_norm": True, "use_qkv_bias": qkv_bias,
        "use_sliding_window": False, "vocab_size": vocab,
        **(extra or {}),
    }
    gen = torch.Generator().manual_seed(seed)
    qkv_rows = (n_heads + 2 * n_kv_heads) * head_dim
    t = {"model.word_embeddings.weight": torch.randn(vocab, d, generator=gen)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm(gen, d)
        t[p + "attention.query_key_value.weight"] = _linear(gen, qkv_rows, d)
        if qkv_bias:
            t[p + "attention.query_key_value.bias"] = 0.1 * torch.randn(qkv_rows, generator=gen)
        t[p + "attention.dense.weight"] = _linear(gen, d, n_heads * head_dim)
        t[p + "attention.query_layernorm.weight"] = _norm(gen, head_dim)
        t[p + "attention.key_layernorm.weight"] = _norm(gen, head_dim)
        t[p + "post_attention_layernorm.weight"] = _norm(gen, d)
        if i < first_dense:
            t[p + "mlp.gate_proj.weight"] = _linear(gen, dense_hidden, d)
            t[p + "mlp.up_proj.weight"] = _linear(gen, dense_hidden, d)
            t[p + "mlp.down_proj.weight"] = _linear(gen, d, dense_hidden)
            continue
        t[p + "mlp.gate.weight"] = 3 * _linear(gen, n_experts, d)  # peaked enough that the choice matters
        # a load-balancing bias of the size of the score gaps, so it changes which experts are chosen
        t[p + "mlp.gate.expert_bias"] = 0.3 * torch.randn(n_experts, generator=gen)
        for e in range(n_experts):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = _linear(gen, expert_hidden, d)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = _linear(gen, expert_hidden, d)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = _linear(gen, d, expert_hidden)
        if n_shared:
            sh = expert_hidden * n_shared
            t[p + "mlp.shared_experts.gate_proj.weight"] = _linear(gen, sh, d)
            t[p + "mlp.shared_experts.up_proj.weight"] = _linear(gen, sh, d)
            t[p + "mlp.shared_experts.down_proj.weight"] = _linear(gen, d, sh)
    t["model.norm.weight"] = _norm(gen, d)
    t["lm_head.weight"] = _linear(gen, vocab, d)
    write_checkpoint(path, config, t, n_shards)
    write_tokenizer(path, hf, LLADA_MOE_TEMPLATE, bos=None, eos="<|endoftext|>", pad="<|endoftext|>")
    return config, t


def read_raw_config(folder: Path, raw: dict):
    """read_config of a folder holding only this config.json: (ModelConfig, family, raw)."""
    (folder / "config.json").write_text(json.dumps(raw))
    return read_config(folder)
