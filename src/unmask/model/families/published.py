"""Published checkpoint layouts: LLaDA (OLMo names), LLaDA-MoE (OLMoE-style names, a mixture of experts), LLaDA2.x
(BailingMoeV2-style names, fused qkv, sigmoid grouped routing, block-causal), Dream
(Qwen2 names, shifted logits), block-diffusion Qwen2.5 models (Fast-dLLM v2: Qwen2 names, block-causal attention,
shifted logits) and block-diffusion Qwen3 models (SDAR and TraDo: Qwen3 names with QK-norm, block-causal
attention, unshifted logits).

Each family reads the checkpoint's own config.json keys and maps its tensor names onto our Transformer
(tok_embeddings, layers.{i}.attention.{wq,wk,wv,wo,q_norm,k_norm}, layers.{i}.feed_forward.{w1 gate, w3 up,
w2 down} or, in mixture-of-experts layers, layers.{i}.feed_forward.{router, experts.{e}.{w1,w3,w2},
shared.{w1,w3,w2}}, attention_norm, ffn_norm, norm, output). Anything the published code can express but our network cannot
(ALiBi, LayerNorm with bias, RoPE scaling, sliding windows, ...) is refused with a ConfigError naming the key,
instead of loading into a model that silently computes something else.

Facts relied on (REFERENCE.md §3, checked against the published config.json / modeling files):
  LLaDA  model_type "llada"; d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size (or mlp_ratio),
         vocab_size, embedding_size (tensor rows, may exceed vocab_size), rope_theta, rms_norm_eps,
         max_sequence_length, mask_token_id 126336, eos/pad 126081, weight_tying, include_qkv_bias.
         Block "llama": ff_out(silu(ff_proj(x)) * up_proj(x)); rotate-half RoPE; bidirectional attention.
  Dream  model_type "Dream"; Qwen2 keys (hidden_size, num_attention_heads, num_key_value_heads, intermediate_size,
         max_position_embeddings, rms_norm_eps, rope_theta, tie_word_embeddings), mask_token_id 151666,
         eos/pad 151643; q/k/v biases; output i predicts token i+1, so logits are shifted right by one.
  Fast-dLLM v2  architectures ["Fast_dLLM_QwenForCausalLM"], model_type "Fast_dLLM_Qwen"; Qwen2 keys plus
         bd_size (block size, 32); its eval mask is block-causal (q_block >= k_block); token shift as Dream;
         the mask token "|<MASK>|" is id 151665 when config.json does not say mask_token_id.
         Official releases are Qwen2.5-based only; a Qwen3-based port (model_type "Fast_dLLM_Qwen3") is refused.
  SDAR   JetLM/SDAR-1.7B/4B/8B-Chat, Gen-Verse/TraDo-4B/8B: architectures ["SDARForCausalLM"], model_type "sdar"
         (JetLM/SDAR-4B-Chat config.json: hidden 2560, 32 heads, 8 kv heads, head_dim 128, attention_bias false,
         untied). modeling_sdar.py (JetAstra/SDAR training/model/SDAR-4B-Chat; darkshapes/divisor divisor/trado)
         is Qwen3's attention: q/k/v/o project to heads * head_dim, head_dim its own key (SDARConfig default 128),
         bias=attention_bias on all four; q_norm/k_norm = RMSNorm(head_dim) on each head of q_proj(x)/k_proj(x),
         before rotate-half RoPE. Logits are not shifted: training scores hidden_states[masked] against
         labels[same positions]; generate.py (JetAstra/SDAR) samples a block from that block's own logits, under
         a mask tril(blocks) repeated block_length times (block-causal). Released config.json has no block size:
         generate.py / README benchmarks, JetEngine (Labman42/JetEngine jetengine/config.py), TraDo
         (Gen-Verse/dLLM-RL README) and SGLang's DLLM_PARAMS all use 4; the modeling code reads config.block_size
         (fine-tuned folders write it), so that key wins. Folders trained with other blocks (-b16, -b64) must
         say block_size. Mask "<|MASK|>" 151669 (added_tokens.json; mask_token_id wins), EOS 151643.
  SDAR-MoE  JetLM/SDAR-30B-A3B-Chat (model_type "sdar_moe", SDARMoeForCausalLM): SDAR's attention and block-causal
         decoding with Qwen3-MoE experts. Its own modeling_sdar_moe.py and config.json were NOT in the searchable
         sources; the facts come from two engines that serve it: JetEngine (Labman42/JetEngine
         jetengine/models/sdar_moe.py: SDARAttention reused, router mlp.gate = Linear(hidden, num_experts, no bias),
         softmax in float32 -> topk(num_experts_per_tok) -> ALWAYS divided by their sum, experts
         mlp.experts.{e}.{gate,up,down}_proj of moe_intermediate_size, MoE where (i+1) % decoder_sparse_step == 0,
         no shared expert) and SGLang (python/sglang/srt/models/sdar_moe.py, as described in a stored code analysis:
         Qwen3MoE-style block, TopK(renormalize=config.norm_topk_prob), MoE in every layer). Where they agree we
         load: norm_topk_prob must be true (the engines disagree otherwise), decoder_sparse_step 1 and no
         mlp_only_layers (they disagree on dense layers); anything else is refused by name. Mask, EOS, block size
         and unshifted logits as SDAR.
  LLaDA-MoE  inclusionAI/LLaDA-MoE-7B-A1B-Base / -Instruct (-Instruct-TD). Sources: the modeling and config code
         as vendored by ZHZisZZ/dllm (dllm/pipelines/llada/models/{modeling,configuration}_lladamoe.py; the
         modeling file says "copied from transformers.models.olmoe"), the HF repo's own configuration_lladamoe.py
         (huggingface.co/inclusionAI/LLaDA-MoE-7B-A1B-Base, class LLaDAConfig with model_type "llada"), inclusionAI's
         dInfer (python/dinfer/model/modeling_fused_olmoe.py), and llama.cpp (ggml-org/llama.cpp
         src/models/llada-moe.cpp, convert_hf_to_gguf.py LLaDAMoEModel).
         config.json: the release keeps model_type "llada" (dllm's README tells users to edit it to "lladamoe")
         with architectures ["LLaDAMoEModelLM"], so it is recognised by architecture or by LLaDA-MoE keys
         (num_experts / expert_intermediate_size), never by model_type alone. Keys: hidden_size,
         num_hidden_layers, num_attention_heads, num_key_value_heads, expert_intermediate_size, num_experts,
         num_experts_per_tok, dense_intermediate_size, shared_expert_intermediate_size, moe_layer_freq, qk_layernorm,
         rope_theta, rope_scaling, partial_rotary_factor, attention_bias, clip_qkv, rms_norm_eps,
         max_position_embeddings, tie_word_embeddings, vocab_size, eos/pad/mask_token_id,
         moe_router_score_function, moe_router_enable_expert_bias, routed_scaling_factor, router_num_group,
         router_topk_group, norm_topk_prob. The 7B-A1B values (secondary sources: dllm's config defaults, llama.cpp,
         dInfer scripts): 16 layers, hidden 2048, 16 heads (head_dim 128, no GQA), 64 experts of width 1024, top-8,
         no shared expert, every layer MoE, qk_layernorm, rope_theta 50000, 8192 positions, vocab 157184,
         EOS/pad 156892 (<|endoftext|>), mask 156895 (<|mask|>: llama.cpp hard-codes it; dInfer's scripts use it).
         The released config.json itself was not in the searchable sources: the mask id default (156895) is taken
         from llama.cpp / dInfer, not from a config.json; a mask_token_id equal to the EOS id (the default of the
         vendored configuration_lladamoe.py, 156892) is read as unset, since a masked-diffusion model cannot use
         EOS as its mask.
         Forward (LLaDAMoEDecoderLayer): x + o_proj(attn(input_layernorm(x))); attention is OLMoE's: q_proj(x),
         k_proj(x) then RMSNorm(head_dim) on every head (q_norm/k_norm on .reshape(-1, head_dim)), v_proj(x),
         rotate-half RoPE over the whole head, head_dim = hidden_size / num_attention_heads, no mask (bidirectional),
         o_proj carries a bias when attention_bias. Then x + mlp(post_attention_layernorm(x)) [+ shared_expert(same
         input)]. LLaDAMoESparseMoeBlock: router_logits = gate(h) (nn.Linear, no bias); softmax over the experts
         axis (dim=1 of [tokens, experts]) in float32; topk(num_experts_per_tok); NOT renormalised: the block sets
         self.norm_topk_prob = False whatever config.json says, as do dInfer (FusedMoE renormalize=False) and
         llama.cpp (norm_w false), so norm_topk_prob is ignored like the published code ignores it; the weights are
         cast to the hidden dtype and multiply each expert's down_proj(silu(gate_proj(h)) * up_proj(h)), summed
         with index_add_. The block stores moe_router_score_function and routed_scaling_factor but never uses
         them; we accept only their neutral values ("softmax", 1) and refuse the others by name rather than guess.
         moe_router_enable_expert_bias adds a buffer to the softmax probabilities before top-k (and keeps it in the
         weights): refused. Layers with moe_layer_freq[i] == 0 hold a dense mlp of dense_intermediate_size: only a
         leading run of them can be expressed (first_dense_layers); others are refused. LM head lm_head (untied
         unless tie_word_embeddings); logits are not shifted (llama.cpp: diffusion_shift_logits false).
         Tensors: model.embed_tokens, model.layers.{i}.{input_layernorm, post_attention_layernorm},
         .self_attn.{q,k,v,o}_proj, .self_attn.{q,k}_norm, .mlp.gate (router, [experts, hidden]),
         .mlp.experts.{e}.{gate,up,down}_proj, .shared_expert.{gate,up,down}_proj, model.norm, lm_head.
  LLaDA2.0 / 2.1  inclusionAI/LLaDA2.0-mini, -flash, -mini-preview, LLaDA2.1-* (model_type "llada2_moe",
         architectures ["LLaDA2MoeModelLM"]). Sources: modeling_llada2_moe.py + configuration_llada2_moe.py as vendored
         by dllm (yks23/Information-Gain-Sampler dllm/dllm/pipelines/llada2/models/), dInfer's copy (kunchengit/dInfer
         python/dinfer/model/modeling_llada2_moe.py; same gate, found again verbatim in several other stored copies);
         config.json values as quoted by third parties (an xLLM HF-loader test "LLaDAModelArgsLoader", mlx-lm ports'
         ModelArgs for LLaDA2.0-mini), NOT the released config.json itself, which was not in the sources.
         LLaDA2.1 is assumed to be the same architecture (same model_type and keys); not checked against its files.
         Tensors: model.word_embeddings, model.layers.{i}.{input_layernorm, post_attention_layernorm},
         .attention.query_key_value (one Linear to (n_heads + 2 n_kv) * head_dim rows, bias=use_qkv_bias; the
         forward views it as [.., n_heads + 2 n_kv, head_dim] and splits q | k | v on the head axis: split at load
         by llada2_split), .attention.dense (o-proj, bias=use_bias: refused when true, and the config class
         defaults it to True), .attention.{query,key}_layernorm (RMSNorm(head_dim) per head before RoPE, when
         use_qk_norm, default True), .mlp.gate.weight [experts, hidden] + .mlp.gate.expert_bias buffer,
         .mlp.experts.{e}.{gate,up,down}_proj (moe_intermediate_size), .mlp.shared_experts.{gate,up,down}_proj (width
         moe_intermediate_size * num_shared_experts), dense .mlp.{gate,up,down}_proj (intermediate_size) in layers
         < first_k_dense_replace, model.norm, lm_head (untied by default).
         RoPE: transformers' default init with partial_rotary_factor (class default 0.5): rotary width
         int(head_dim * factor), inv_freq over that width; apply_rotary_pos_emb rotates q[..., :rd] rotate-half and
         passes q[..., rd:] through. head_dim its own key (else hidden / heads).
         Gate (LLaDA2MoeGate): logits = hidden.float() @ weight.float().T; scores = sigmoid (hard-coded; the
         score_function key is never read: only "sigmoid" accepted); choice = scores + expert_bias; groups: view as
         [n_group, E/n_group], group score = sum of its top-2 choice scores, keep top topk_group groups, others -inf;
         top-k (num_experts_per_tok) on choice; weights = the UNBIASED scores of the chosen experts, divided by
         their sum (+1e-20) only when top_k > 1 (norm_topk_prob is never read: only true/absent accepted), times
         routed_scaling_factor (class default 2.5). Shared experts added on the same input. Config defaults used
         for absent keys: n_group 8, topk_group 4, num_shared_experts 0, first_k_dense_replace 0.
         Attention mask: the published generate() builds tril(ones(blocks)) repeated block_length (default 32)
         times: block-causal over blocks aligned at position 0; the block size is not in config.json, so 32 (a
         block_size key wins, as for SDAR). Logits not shifted (loss on the same positions). generate()'s
         defaults: mask_id 156895, eos_id 156892 (config pad_token_id 156892).
         LLaDA2.0-mini (third-party quotes): hidden 2048, 20 layers, 16 heads, 4 kv heads, head_dim 128,
         intermediate 5120, 256 experts of 512, top-8, 1 shared, n_group 8, topk_group 4, scaling 2.5,
         first_k_dense_replace 1, rope_theta 600000, partial 0.5, rms eps 1e-6, 32768 positions, vocab 157184,
         use_bias/use_qkv_bias false, use_qk_norm true, untied (the "llada2-mini" shape).
         Refused by name: use_bias true, rope_scaling, use_sliding_window true, norm_head true (stored, never
         applied), score_function other than sigmoid, norm_topk_prob false, a rotary width < 2 or odd, groups
         that do not split the experts into equal groups of >= 2 holding the top-k, hidden_act other than silu.
"""

from __future__ import annotations

from typing import Any

import torch

from unmask.model.config import ConfigError, ModelConfig
from unmask.model.families.family import Family

LLADA_MASK_ID, LLADA_EOS_ID = 126336, 126081
QWEN_EOS_ID = 151643  # <|endoftext|> of the Qwen2.5 and Qwen3 tokenizers
DREAM_MASK_ID = 151666
FAST_DLLM_MASK_ID = 151665
SDAR_MASK_ID, SDAR_BLOCK_SIZE, SDAR_HEAD_DIM = 151669, 4, 128
LLADA_MOE_MASK_ID, LLADA_MOE_EOS_ID = 156895, 156892
LLADA2_MASK_ID, LLADA2_EOS_ID, LLADA2_BLOCK_SIZE = 156895, 156892, 32


def _require(raw: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if raw.get(k) is None]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(missing)}")


_ABSENT = object()


def _refuse(raw: dict[str, Any], key: str, ok: Any, why: str, default: Any = _ABSENT) -> None:
    """Refuse a config value our network cannot express. `ok` is the allowed value (or a tuple of them);
    `default` is what the published code uses when the key is absent (unset: absence is fine)."""
    if key not in raw and default is _ABSENT:
        return
    value = raw.get(key, default)
    allowed = ok if isinstance(ok, tuple) else (ok,)
    if value not in allowed:
        absent = "" if key in raw else ", the published default when the key is absent"
        raise ConfigError(f"{key}={value!r}{absent} is not supported ({why})")


def _positive_int(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _first_id(value: Any, default: int | None) -> int | None:
    """HF configs give token ids as an int, a list of ints (several EOS) or null."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


# --- LLaDA ------------------------------------------------------------------------------------------
LLADA_NAMES: dict[str, str | None] = {
    "model.transformer.wte.weight": "tok_embeddings.weight",
    "model.transformer.blocks.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "model.transformer.blocks.{}.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.transformer.blocks.{}.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.transformer.blocks.{}.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.transformer.blocks.{}.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.transformer.blocks.{}.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.transformer.blocks.{}.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.transformer.blocks.{}.attn_out.weight": "layers.{}.attention.wo.weight",
    "model.transformer.blocks.{}.ff_norm.weight": "layers.{}.ffn_norm.weight",
    "model.transformer.blocks.{}.ff_proj.weight": "layers.{}.feed_forward.w1.weight",  # the gate
    "model.transformer.blocks.{}.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.transformer.blocks.{}.ff_out.weight": "layers.{}.feed_forward.w2.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "output.weight",  # the LM head (absent when weight_tying)
}


def llada_config(raw: dict[str, Any]) -> ModelConfig:
    _require(raw, "d_model", "n_heads", "n_layers", "vocab_size")
    # an absent key takes configuration_llada.ModelConfig's (OLMo's) default, not the 8B checkpoints' value
    _refuse(raw, "block_type", "llama", "only LLaDA's llama block: separate q/k/v and gate/up projections",
            default="sequential")
    _refuse(raw, "activation_type", "silu", "the llama block computes silu(ff_proj) * up_proj", default="swiglu")
    _refuse(raw, "layer_norm_type", "rms", "RMSNorm only", default="default")
    _refuse(raw, "layer_norm_with_affine", True, "RMSNorm with a weight")
    _refuse(raw, "include_bias", False, "biases only on q/k/v (include_qkv_bias)")
    _refuse(raw, "alibi", False, "RoPE only")
    _refuse(raw, "rope", True, "RoPE only", default=False)
    _refuse(raw, "attention_layer_norm", False, "no QK layer norm in LLaDA checkpoints")
    _refuse(raw, "scale_logits", False, "unscaled logits")
    _refuse(raw, "input_emb_norm", False, "no embedding norm")
    _refuse(raw, "block_group_size", 1, "one block per group (weights named blocks.{i}, not block_groups.{i})")
    d, n_heads = int(raw["d_model"]), int(raw["n_heads"])
    n_kv = raw.get("n_kv_heads") or (1 if raw.get("multi_query_attention") else n_heads)
    hidden = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4)) * d
    # OLMo pads the embedding matrix (and the untied head) to embedding_size rows; ids above vocab_size
    # are never produced by the tokenizer, so the model simply has a larger vocabulary.
    vocab = int(raw.get("embedding_size") or raw["vocab_size"])
    if vocab < int(raw["vocab_size"]):
        raise ConfigError(f"embedding_size {vocab} is smaller than vocab_size {raw['vocab_size']}")
    eos = _first_id(raw.get("eos_token_id"), LLADA_EOS_ID)
    return ModelConfig(
        vocab_size=vocab, dim=d, n_layers=int(raw["n_layers"]), n_heads=n_heads, n_kv_heads=int(n_kv),
        ffn_hidden=int(hidden), max_seq_len=int(raw.get("max_sequence_length", 4096)),
        rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        attn_bias=bool(raw.get("include_qkv_bias", False)), tie_embeddings=bool(raw.get("weight_tying", True)),  # configuration_llada's default
        attention="bidirectional", logits_shift=False,
        mask_id=_first_id(raw.get("mask_token_id"), LLADA_MASK_ID), eos_id=eos,
        pad_id=_first_id(raw.get("pad_token_id"), eos), bos_id=_first_id(raw.get("bos_token_id"), None),
        family="llada", extra={"tokenizer_vocab_size": int(raw["vocab_size"])},
    )


def is_llada(raw: dict[str, Any]) -> bool:
    if is_llada_moe(raw):
        return False
    return str(raw.get("model_type", "")).lower() == "llada" or "LLaDAModelLM" in (raw.get("architectures") or [])


_SWIGLU = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))


def _expert_names(shared: str | None = None) -> dict[str, str]:
    """Routed experts under `mlp.experts.{e}`, and the shared expert at `shared` if there is one: the names
    LLaDA-MoE, LLaDA2 and Qwen3-MoE (SDAR-MoE) share."""
    out = {f"model.layers.{{}}.mlp.experts.{{}}.{p}.weight": f"layers.{{}}.feed_forward.experts.{{}}.{w}.weight"
           for p, w in _SWIGLU}
    if shared:
        out |= {f"model.layers.{{}}.{shared}.{p}.weight": f"layers.{{}}.feed_forward.shared.{w}.weight"
                for p, w in _SWIGLU}
    return out


# a MoE model's dense-layer mlp, final norm and head (LLaDA-MoE and LLaDA2 alike)
_DENSE_MLP_AND_HEAD: dict[str, str | None] = {
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.rotary_emb.inv_freq": None,
}


# --- LLaDA-MoE ----------------------------------------------------------------------------------------------
LLADA_MOE_NAMES: dict[str, str | None] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate.weight": "layers.{}.feed_forward.router.weight",
    **_expert_names("shared_expert"),
    # the dense mlp of layers whose moe_layer_freq entry is 0
    **_DENSE_MLP_AND_HEAD,
}


def is_llada_moe(raw: dict[str, Any]) -> bool:
    """LLaDA-MoE keeps model_type "llada" in its released config.json: recognise it by architecture, by the
    names tools rewrite model_type to, or by its expert keys on an OLMoE-style (hidden_size) config."""
    archs = [str(a) for a in raw.get("architectures") or []]
    model_type = str(raw.get("model_type", "")).lower()
    return (any(a.startswith("LLaDAMoE") for a in archs) or model_type in ("lladamoe", "llada_moe")
            or (model_type == "llada" and "d_model" not in raw
                and any(k in raw for k in ("num_experts", "expert_intermediate_size"))))


def llada_moe_config(raw: dict[str, Any]) -> ModelConfig:
    _require(raw, "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "num_experts",
             "num_experts_per_tok", "expert_intermediate_size", "qk_layernorm")
    _refuse(raw, "hidden_act", "silu", "SwiGLU with silu")
    _refuse(raw, "attention_bias", False, "no attention biases: LLaDA-MoE's would include one on o_proj, which we lack")
    _refuse(raw, "clip_qkv", None, "unclipped q/k/v")
    _refuse(raw, "partial_rotary_factor", (1, 1.0), "RoPE over the whole head")
    _refuse(raw, "rope_scaling", None, "plain RoPE; scaled RoPE variants are not implemented")
    # routing: the published block always computes softmax -> top-k with no bias, group limit or scaling
    _refuse(raw, "moe_router_score_function", "softmax", "softmax routing (the published block ignores the key, so "
            "another value is ambiguous)")
    _refuse(raw, "moe_router_enable_expert_bias", False, "no expert bias in routing")
    _refuse(raw, "routed_scaling_factor", (1, 1.0, None), "unscaled expert weights (the published block ignores "
            "the key, so another value is ambiguous)")
    _refuse(raw, "router_num_group", None, "top-k over all experts, no expert groups")
    _refuse(raw, "router_topk_group", None, "top-k over all experts, no expert groups")
    d, n_heads, n_layers = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_hidden_layers"])
    if d % n_heads:
        raise ConfigError(f"hidden_size {d} is not divisible by num_attention_heads {n_heads}")
    if raw.get("head_dim") not in (None, d // n_heads):
        raise ConfigError(f"head_dim={raw['head_dim']} is not supported (must be hidden_size / num_attention_heads)")
    freq = raw.get("moe_layer_freq")
    freq = [1] * n_layers if freq is None else list(freq)
    if len(freq) != n_layers or any(f not in (0, 1) for f in freq):
        raise ConfigError(f"moe_layer_freq={freq!r} is not supported (one 0/1 entry per layer)")
    first_dense = freq.index(1) if 1 in freq else n_layers
    if any(f == 0 for f in freq[first_dense:]):
        raise ConfigError(f"moe_layer_freq={freq!r} is not supported (dense layers only as a leading run)")
    if first_dense == n_layers:
        raise ConfigError("moe_layer_freq has no mixture-of-experts layer (load it as a dense model instead)")
    shared = raw.get("shared_expert_intermediate_size")
    shared = 0 if shared is None else _positive_int(raw, "shared_expert_intermediate_size", 0)
    if first_dense:
        _require(raw, "dense_intermediate_size")
    dense_hidden = _positive_int(raw, "dense_intermediate_size", 1) if first_dense else None
    eos = _first_id(raw.get("eos_token_id"), LLADA_MOE_EOS_ID)
    mask = _first_id(raw.get("mask_token_id"), LLADA_MOE_MASK_ID)
    if mask == eos:  # configuration_lladamoe's default mask_token_id is the EOS id; the models decode with <|mask|>
        mask = LLADA_MOE_MASK_ID
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]), dim=d, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads), head_dim=d // n_heads, ffn_hidden=dense_hidden,
        max_seq_len=int(raw.get("max_position_embeddings", 4096)), rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)), qk_norm=bool(raw["qk_layernorm"]),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)), attention="bidirectional", logits_shift=False,
        n_experts=_positive_int(raw, "num_experts", 1), n_experts_per_token=_positive_int(raw, "num_experts_per_tok", 1),
        expert_hidden=_positive_int(raw, "expert_intermediate_size", 1), shared_expert_hidden=shared,
        first_dense_layers=first_dense, router_renormalize=False,  # the published block never renormalises
        mask_id=mask, eos_id=eos,
        pad_id=_first_id(raw.get("pad_token_id"), eos), bos_id=_first_id(raw.get("bos_token_id"), None),
        family="llada_moe",
    )


# --- LLaDA2.0 / LLaDA2.1 (llada2_moe, BailingMoeV2 style) --------------------------------------------------
LLADA2_NAMES: dict[str, str | None] = {
    "model.word_embeddings.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    # fused [q heads; k heads; v heads] rows, split by LLADA2.split
    "model.layers.{}.attention.query_key_value.weight": "layers.{}.attention.wqkv.weight",
    "model.layers.{}.attention.query_key_value.bias": "layers.{}.attention.wqkv.bias",
    "model.layers.{}.attention.dense.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.attention.query_layernorm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.attention.key_layernorm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate.weight": "layers.{}.feed_forward.router.weight",
    "model.layers.{}.mlp.gate.expert_bias": "layers.{}.feed_forward.router_bias",
    **_expert_names("mlp.shared_experts"),
    # the dense mlp of the first first_k_dense_replace layers
    **_DENSE_MLP_AND_HEAD,
}


def is_llada2(raw: dict[str, Any]) -> bool:
    """LLaDA2.0 / 2.1: model_type "llada2_moe", architectures ["LLaDA2MoeModelLM"]."""
    return str(raw.get("model_type", "")).lower().startswith("llada2") or any(
        str(a).startswith("LLaDA2") for a in raw.get("architectures") or [])


def llada2_config(raw: dict[str, Any]) -> ModelConfig:
    _require(raw, "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "num_experts",
             "num_experts_per_tok", "moe_intermediate_size")
    _refuse(raw, "hidden_act", "silu", "SwiGLU with silu")
    # absent keys take configuration_llada2_moe.LLaDA2MoeConfig's defaults
    _refuse(raw, "use_bias", False, "no bias on the attention output (dense) projection", default=True)
    _refuse(raw, "rope_scaling", None, "plain RoPE; scaled RoPE variants are not implemented")
    _refuse(raw, "use_sliding_window", False, "full attention")
    _refuse(raw, "norm_head", False, "a plain lm_head (the published model stores norm_head but never applies it, "
            "so another value is ambiguous)")
    _refuse(raw, "score_function", "sigmoid", "sigmoid routing (the published gate hard-codes it, so another "
            "value is ambiguous)")
    _refuse(raw, "norm_topk_prob", (True, None), "the published gate always renormalises top-k>1 weights, so "
            "another value is ambiguous")
    d, n_heads, n_layers = int(raw["hidden_size"]), int(raw["num_attention_heads"]), int(raw["num_hidden_layers"])
    if not raw.get("head_dim") and d % n_heads:
        raise ConfigError(f"hidden_size {d} is not divisible by num_attention_heads {n_heads} (and no head_dim)")
    head_dim = int(raw.get("head_dim") or d // n_heads)
    factor = raw.get("partial_rotary_factor", 0.5)
    rotary = int(head_dim * float(factor))  # transformers' default RoPE init: dim = int(head_dim * factor)
    if rotary < 2 or rotary % 2:
        raise ConfigError(f"partial_rotary_factor={factor!r} is not supported (head_dim {head_dim} * factor must "
                          "be an even number >= 2)")
    n_experts, k = _positive_int(raw, "num_experts", 1), _positive_int(raw, "num_experts_per_tok", 1)
    groups, topk_groups = _positive_int(raw, "n_group", 8), _positive_int(raw, "topk_group", 4)
    if n_experts % groups or n_experts // groups < 2 or topk_groups > groups or k > topk_groups * (n_experts // groups):
        raise ConfigError(f"n_group={groups}, topk_group={topk_groups} is not supported with num_experts={n_experts}, "
                          f"num_experts_per_tok={k} (equal groups of >= 2 experts holding the top-k)")
    first_dense = raw.get("first_k_dense_replace", 0)
    if isinstance(first_dense, bool) or not isinstance(first_dense, int) or not 0 <= first_dense < n_layers:
        raise ConfigError(f"first_k_dense_replace={first_dense!r} is not supported (0 <= value < num_hidden_layers)")
    if first_dense:
        _require(raw, "intermediate_size")
    expert_hidden = _positive_int(raw, "moe_intermediate_size", 1)
    shared = raw.get("num_shared_experts", 0)
    if shared is not None and (isinstance(shared, bool) or not isinstance(shared, int) or shared < 0):
        raise ConfigError(f"num_shared_experts must be a non-negative integer, got {shared!r}")
    eos = _first_id(raw.get("eos_token_id"), LLADA2_EOS_ID)
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]), dim=d, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        ffn_hidden=_positive_int(raw, "intermediate_size", 1) if first_dense else None,
        max_seq_len=int(raw.get("max_position_embeddings", 16384)), rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)), qk_norm=bool(raw.get("use_qk_norm", True)),
        attn_bias=bool(raw.get("use_qkv_bias", False)), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention="block_causal", block_size=_positive_int(raw, "block_size", LLADA2_BLOCK_SIZE), logits_shift=False,
        rotary_dim=None if rotary == head_dim else rotary,
        n_experts=n_experts, n_experts_per_token=k, expert_hidden=expert_hidden,
        shared_expert_hidden=expert_hidden * (shared or 0), first_dense_layers=first_dense,
        router_renormalize=k > 1,  # the published gate renormalises only when top_k > 1
        router_score="sigmoid", router_expert_bias=bool(raw.get("moe_router_enable_expert_bias", True)),
        router_groups=groups, router_topk_groups=topk_groups,
        routed_scaling=float(raw.get("routed_scaling_factor", 2.5)),
        mask_id=_first_id(raw.get("mask_token_id"), LLADA2_MASK_ID), eos_id=eos,
        pad_id=_first_id(raw.get("pad_token_id"), eos), bos_id=_first_id(raw.get("bos_token_id"), None),
        family="llada2",
    )


def llada2_split(name: str, t: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """query_key_value rows are [n_heads heads; n_kv heads of k; n_kv heads of v], head_dim rows each (the
    published forward views them as [..., n_heads + 2 * n_kv, head_dim] and splits on the head axis)."""
    if ".attention.wqkv." not in name:
        return {name: t}
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    if t.shape[0] != q + 2 * kv:
        raise ConfigError(f"config.json does not match the weights: query_key_value has {t.shape[0]} rows, the "
                          f"config implies {q} + 2 * {kv}")
    wq, wk, wv = t.split([q, kv, kv], dim=0)
    return {name.replace("wqkv", part): x for part, x in (("wq", wq), ("wk", wk), ("wv", wv))}


# --- Qwen2 layout: Dream and block-diffusion Qwen2.5; Qwen3 layout: SDAR / TraDo ------------------------------
QWEN2_NAMES: dict[str, str | None] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",  # skipped by the loader when tie_word_embeddings
    # RoPE tables some exporters save; we recompute them
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    "model.rotary_emb.inv_freq": None,
}
# Qwen3: no q/k/v biases (attention_bias is refused), plus the per-head QK RMSNorm weights
QWEN3_NAMES: dict[str, str | None] = {k: v for k, v in QWEN2_NAMES.items() if not k.endswith("_proj.bias")} | {
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
}


def _qwen2_attention(raw: dict[str, Any], d: int, n_heads: int) -> tuple[int, bool]:
    """(head_dim, q/k/v biases) of Qwen2 attention: the heads split hidden_size and q/k/v always carry biases."""
    names = [str(raw.get("model_type", ""))] + [str(a) for a in raw.get("architectures") or []]
    if any("qwen3" in name.lower() for name in names):  # e.g. a Fast_dLLM_Qwen3 port: q_norm/k_norm, own head_dim
        raise ConfigError(f"model_type={raw.get('model_type')!r} is not supported (a Qwen3-based variant of a "
                          "Qwen2.5 family; only its Qwen2.5-based releases were verified)")
    if raw.get("head_dim") not in (None, d // n_heads):
        raise ConfigError(f"head_dim={raw['head_dim']} is not supported (must be hidden_size / num_attention_heads)")
    return d // n_heads, bool(raw.get("attention_bias", True))


def _qwen3_attention(raw: dict[str, Any]) -> tuple[int, bool]:
    """(head_dim, biases) of Qwen3 attention: head_dim is its own key, and attention_bias would bias o_proj too."""
    _refuse(raw, "attention_bias", False, "no attention biases: Qwen3's include one on o_proj, which we lack")
    return _positive_int(raw, "head_dim", SDAR_HEAD_DIM), False


def qwen2_config(raw: dict[str, Any], *, family: str, mask_default: int, eos_default: int, attention: str,
                 block_size: int = 32, logits_shift: bool = True, qwen3: bool = False,
                 moe: dict[str, Any] | None = None) -> ModelConfig:
    """Qwen2-style config keys -> ModelConfig; `qwen3` for Qwen3 attention (per-head q_norm/k_norm, own head_dim);
    `moe`: the ModelConfig mixture-of-experts fields."""
    _require(raw, "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    _refuse(raw, "hidden_act", "silu", "SwiGLU with silu")
    # RoPE: rope_theta + rope_scaling, or (configs written by transformers >= 5) one rope_parameters dict holding
    # rope_theta and rope_type. rope_type "default" is plain RoPE; every other type rescales the frequencies.
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if rope is not None and (not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "default"):
            raise ConfigError(f"{key}={rope!r} is not supported (plain RoPE; scaled RoPE variants are not implemented)")
    theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    _refuse(raw, "use_sliding_window", False, "full attention")
    _refuse(raw, "use_mrope", False, "1-D RoPE")
    d, n_heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim, attn_bias = _qwen3_attention(raw) if qwen3 else _qwen2_attention(raw, d, n_heads)
    eos = _first_id(raw.get("eos_token_id"), eos_default)
    return ModelConfig(
        vocab_size=int(raw["vocab_size"]), dim=d, n_layers=int(raw["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        ffn_hidden=int(raw["intermediate_size"]), max_seq_len=int(raw.get("max_position_embeddings", 32768)),
        rope_theta=float(theta), norm_eps=float(raw.get("rms_norm_eps", 1e-6)), qk_norm=qwen3, attn_bias=attn_bias,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention=attention, block_size=block_size,
        logits_shift=logits_shift,  # AR-initialised Dream / Fast-dLLM: output i-1 predicts token i
        mask_id=_first_id(raw.get("mask_token_id"), mask_default), eos_id=eos,
        pad_id=_first_id(raw.get("pad_token_id"), eos), bos_id=_first_id(raw.get("bos_token_id"), None),
        family=family, **(moe or {}),
    )


def is_dream(raw: dict[str, Any]) -> bool:
    return str(raw.get("model_type", "")).lower() == "dream" or "DreamModel" in (raw.get("architectures") or [])


def dream_config(raw: dict[str, Any]) -> ModelConfig:
    return qwen2_config(raw, family="dream", mask_default=DREAM_MASK_ID, eos_default=QWEN_EOS_ID,
                        attention="bidirectional")


def is_block_qwen(raw: dict[str, Any]) -> bool:
    """Fast-dLLM v2 style: its own model_type / architecture, or a Qwen2 config carrying bd_size."""
    model_type = str(raw.get("model_type", "")).lower()
    archs = raw.get("architectures") or []
    return (model_type.startswith("fast_dllm") or any(str(a).startswith("Fast_dLLM") for a in archs)
            or (model_type == "qwen2" and "bd_size" in raw))


def block_qwen_config(raw: dict[str, Any]) -> ModelConfig:
    block = _positive_int(raw, "bd_size", raw.get("block_size", 32))
    return qwen2_config(raw, family="block_qwen", mask_default=FAST_DLLM_MASK_ID, eos_default=QWEN_EOS_ID,
                        attention="block_causal", block_size=block)


def is_sdar(raw: dict[str, Any]) -> bool:
    """SDAR and TraDo (model_type "sdar", SDARForCausalLM), and the MoE sibling SDAR-30B-A3B ("sdar_moe")."""
    model_type = str(raw.get("model_type", "")).lower()
    return model_type.startswith("sdar") or any(str(a).startswith("SDAR") for a in raw.get("architectures") or [])


def _sdar_moe(raw: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig MoE fields of SDAR-30B-A3B (Qwen3-MoE experts on SDAR attention), or {} for a dense SDAR."""
    archs = [str(a) for a in raw.get("architectures") or []]
    if not ("moe" in str(raw.get("model_type", "")).lower() or "num_experts" in raw or any("Moe" in a for a in archs)):
        return {}
    _require(raw, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
    if raw["norm_topk_prob"] is not True:
        raise ConfigError(f"norm_topk_prob={raw['norm_topk_prob']!r} is not supported for SDAR-MoE (JetEngine's block "
                          "always renormalises the top-k weights, SGLang's follows the key: only True is unambiguous)")
    _refuse(raw, "decoder_sparse_step", 1, "every layer a mixture of experts")
    if raw.get("mlp_only_layers"):
        raise ConfigError(f"mlp_only_layers={raw['mlp_only_layers']!r} is not supported (every layer a mixture of "
                          "experts; the published engines differ on dense layers)")
    for key in ("shared_expert_intermediate_size", "num_shared_experts"):
        _refuse(raw, key, (None, 0), "no shared expert in Qwen3-MoE")
    return dict(n_experts=_positive_int(raw, "num_experts", 1), n_experts_per_token=_positive_int(raw, "num_experts_per_tok", 1),
                expert_hidden=_positive_int(raw, "moe_intermediate_size", 1), router_renormalize=True)


def sdar_config(raw: dict[str, Any]) -> ModelConfig:
    moe = _sdar_moe(raw)
    return qwen2_config(raw, family="sdar_moe" if moe else "sdar", mask_default=SDAR_MASK_ID, eos_default=QWEN_EOS_ID,
                        attention="block_causal", block_size=_positive_int(raw, "block_size", SDAR_BLOCK_SIZE),
                        logits_shift=False, qwen3=True, moe=moe)


LLADA = Family(name="llada", matches=is_llada, to_config=llada_config, name_map=LLADA_NAMES)
DREAM = Family(name="dream", matches=is_dream, to_config=dream_config, name_map=QWEN2_NAMES)
BLOCK_QWEN = Family(name="block_qwen", matches=is_block_qwen, to_config=block_qwen_config, name_map=QWEN2_NAMES)
# SDAR-MoE: Qwen3-MoE's router and experts under each layer's mlp
QWEN3_MOE_NAMES: dict[str, str | None] = QWEN3_NAMES | {
    "model.layers.{}.mlp.gate.weight": "layers.{}.feed_forward.router.weight",
    **_expert_names(),
}
SDAR = Family(name="sdar", matches=is_sdar, to_config=sdar_config, name_map=QWEN3_MOE_NAMES)

LLADA_MOE = Family(name="llada_moe", matches=is_llada_moe, to_config=llada_moe_config, name_map=LLADA_MOE_NAMES)
LLADA2 = Family(name="llada2", matches=is_llada2, to_config=llada2_config, name_map=LLADA2_NAMES, split=llada2_split)

FAMILIES = [LLADA_MOE, LLADA2, LLADA, DREAM, BLOCK_QWEN, SDAR]
