"""Model configuration: one dataclass, saved as `config.json` beside the weights."""

from __future__ import annotations

from unmask.errors import UnmaskError

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_MODES = ("bidirectional", "causal", "block_causal")
BLOCK_ATTENTION = ("bidirectional", "causal")
ADAPTER_TOKENS = ("masks", "all")
QUANTIZATIONS = ("int8", "fp8", "int4-g32", "int4-g64", "int4-g128")  # model/quantize.py SCHEMES


class ConfigError(UnmaskError, ValueError):
    """A config that cannot describe a model (bad values, unknown keys, missing file)."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    head_dim: int | None = None  # None = dim // n_heads; Qwen3 decouples it (q/k/v project to n_heads * head_dim)
    ffn_hidden: int | None = None  # None = SwiGLU default, ~8/3 * dim rounded to 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    attn_bias: bool = False  # q/k/v biases (Qwen2 / Dream)
    tie_embeddings: bool = False
    attention: str = "bidirectional"  # bidirectional | causal | block_causal
    block_size: int = 32  # used when attention == "block_causal"
    # inside a block of a block_causal model: "bidirectional" (BD3-LM, Fast-dLLM v2) or "causal" (masks are
    # placeholders for future tokens; with logits_shift the leftmost mask is read from a committed token, so
    # it is predicted as the AR model predicts it)
    block_attention: str = "bidirectional"
    # low-rank adapter on every linear layer of every block (0 = none), out = W x + (alpha/rank) B A x,
    # added on `adapter_tokens`: "masks" (only at [MASK] inputs, so committed tokens compute exactly as the
    # base model) or "all"; with an adapter the [MASK] input embedding is its own vector (mask_embedding)
    adapter_rank: int = 0
    adapter_alpha: float = 32.0
    adapter_tokens: str = "masks"
    # weights stored quantized per output row (model/quantize.py): None, "int8" or "fp8"
    quantization: str | None = None
    # Dream / AR-adapted models: output i predicts token i+1, so a masked token is read from i-1.
    logits_shift: bool = False
    # mixture of experts (n_experts 0 = every layer has one dense SwiGLU of ffn_hidden): the first
    # `first_dense_layers` layers stay dense; the others route each token to `n_experts_per_token` of `n_experts`
    # SwiGLU experts of width `expert_hidden` (softmax over all experts, then top-k; `router_renormalize` divides
    # the k weights by their sum), plus an always-on shared SwiGLU of width `shared_expert_hidden` (0 = none).
    n_experts: int = 0
    n_experts_per_token: int = 0
    expert_hidden: int = 0
    shared_expert_hidden: int = 0
    first_dense_layers: int = 0
    router_renormalize: bool = False
    # routing variants (LLaDA2.x / BailingMoeV2); the defaults are the plain softmax router above.
    # router_score "sigmoid": each expert scored independently by sigmoid(logit) instead of a softmax.
    # router_expert_bias: a per-expert buffer `router_bias` added to the scores only to *choose* experts; the
    #   weights are the unbiased scores of the chosen ones. router_groups > 0 splits the experts into that many
    #   equal groups, scores each group by the sum of its two best (biased) scores and lets a token choose only
    #   among the experts of its router_topk_groups best groups. routed_scaling multiplies the final weights
    #   (after any renormalisation).
    router_score: str = "softmax"
    router_expert_bias: bool = False
    router_groups: int = 0
    router_topk_groups: int = 0
    routed_scaling: float = 1.0
    # partial RoPE: only the first rotary_dim features of each head are rotated (rotate-half within them,
    # frequencies over rotary_dim); the rest pass through. None = the whole head.
    rotary_dim: int | None = None
    # special token ids (the tokenizer's; kept here so a model folder is self-describing)
    mask_id: int = 0
    eos_id: int = 1
    pad_id: int = 1
    bos_id: int | None = None
    family: str = "unmask"  # which checkpoint layout the weights came from (see model/families)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads} (or set head_dim)")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_hidden is None:
            hidden = int(8 * self.dim / 3)
            self.ffn_hidden = 64 * ((hidden + 63) // 64)
        self.validate()

    def validate(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rotary_dim is not None and not (2 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and in [2, head_dim={self.head_dim}]")
        if self.router_score not in ("softmax", "sigmoid"):
            raise ConfigError(f"router_score must be 'softmax' or 'sigmoid', got {self.router_score!r}")
        if self.router_groups:
            g, tg = self.router_groups, self.router_topk_groups
            if g < 1 or self.n_experts % g or self.n_experts // g < 2:
                raise ConfigError(f"router_groups {g} must split n_experts {self.n_experts} into equal groups of >= 2")
            if not 1 <= tg <= g or self.n_experts_per_token > tg * (self.n_experts // g):
                raise ConfigError(f"router_topk_groups {tg} must be in [1, router_groups={g}] and its groups must hold "
                                  f"n_experts_per_token={self.n_experts_per_token} experts")
        elif self.router_topk_groups:
            raise ConfigError("router_topk_groups needs router_groups > 0")
        if self.block_attention not in BLOCK_ATTENTION:
            raise ConfigError(f"block_attention must be one of {BLOCK_ATTENTION}, got {self.block_attention!r}")
        if self.adapter_rank < 0 or self.adapter_tokens not in ADAPTER_TOKENS:
            raise ConfigError(f"adapter_rank must be >= 0 and adapter_tokens one of {ADAPTER_TOKENS}, got "
                              f"{self.adapter_rank}, {self.adapter_tokens!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {QUANTIZATIONS} or null, got {self.quantization!r}")
        if self.attention == "block_causal" and self.block_size < 1:
            raise ConfigError("block_size must be >= 1 for block_causal attention")
        if self.n_experts:
            if not 1 <= self.n_experts_per_token <= self.n_experts:
                raise ConfigError(f"n_experts_per_token must be in [1, n_experts={self.n_experts}], "
                                  f"got {self.n_experts_per_token}")
            if self.expert_hidden < 1:
                raise ConfigError(f"expert_hidden must be >= 1 for a mixture of experts, got {self.expert_hidden}")
        elif (self.n_experts_per_token or self.shared_expert_hidden or self.first_dense_layers or self.router_groups
              or self.router_expert_bias):
            raise ConfigError("n_experts_per_token, shared_expert_hidden, first_dense_layers, router_groups and "
                              "router_expert_bias need n_experts > 0")
        if self.n_experts < 0 or self.shared_expert_hidden < 0 or not 0 <= self.first_dense_layers <= self.n_layers:
            raise ConfigError("n_experts, shared_expert_hidden must be >= 0 and first_dense_layers in [0, n_layers]")
        for name in ("mask_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary (size {self.vocab_size})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        check_field_types(cls, data)
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.first_dense_layers

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count; `active`: only the experts one token runs through (k routed + shared)."""
        d, h, kv, f = self.dim, self.n_heads, self.n_kv_heads, self.ffn_hidden
        hd = self.head_dim
        attn = d * (h * hd) + 2 * d * (kv * hd) + (h * hd) * d
        if self.attn_bias:
            attn += h * hd + 2 * kv * hd
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        experts = self.n_experts_per_token if active else self.n_experts
        moe = experts * 3 * d * self.expert_hidden + d * self.n_experts + 3 * d * self.shared_expert_hidden
        body = sum(attn + norms + (moe if self.is_moe_layer(i) else 3 * d * f) for i in range(self.n_layers)) + d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return body + (emb if include_embeddings else 0)


def _json_type_ok(value: Any, kind: type) -> bool:
    """Whether a JSON value fits a field type: an int is no bool, a float may be written as an int."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_field_types(cls: type, data: dict[str, Any]) -> None:
    """A ConfigError naming the first field of `data` (a config.json) whose value has the wrong JSON type,
    e.g. `"n_layers": 3.5` or `"dim": "128"`: otherwise it fails deep inside the model as a traceback."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        hint = hints[name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = tuple(typing.get_origin(k) or k for k in (typing.get_args(hint) if union else (hint,)))
        if value is None and type(None) in kinds:
            continue
        if not any(_json_type_ok(value, k) for k in kinds if k is not type(None)):
            want = " or ".join(k.__name__ for k in kinds if k is not type(None))
            nullable = " (or null)" if type(None) in kinds else ""
            raise ConfigError(f"config field {name}: expected {want}{nullable}, got {json.dumps(value)}")


# Named shapes for benchmarks and tests (random weights): `--shape llada-8b`.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "small-34m": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, max_seq_len=512),
    "llada-8b": dict(
        vocab_size=126464, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=12288,
        max_seq_len=4096, rope_theta=500000.0, mask_id=126336, eos_id=126081, pad_id=126081,
        bos_id=126080, family="llada",
    ),
    "dream-7b": dict(
        vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_hidden=18944,
        max_seq_len=2048, rope_theta=1000000.0, norm_eps=1e-6, attn_bias=True, logits_shift=True,
        mask_id=151666, eos_id=151643, pad_id=151643, family="dream",
    ),
    "sdar-4b": dict(  # JetLM/SDAR-4B-Chat, TraDo-4B: Qwen3-4B with block-causal attention (blocks of 4)
        vocab_size=151936, dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_hidden=9728,
        max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True, attention="block_causal",
        block_size=4, mask_id=151669, eos_id=151643, pad_id=151643, bos_id=151643, family="sdar",
    ),
    "llada2-mini": dict(  # inclusionAI/LLaDA2.0-mini (16B, 1.4B active): 256 experts of 512, top-8 of 4 of 8 groups
        vocab_size=157184, dim=2048, n_layers=20, n_heads=16, n_kv_heads=4, head_dim=128, ffn_hidden=5120,
        max_seq_len=32768, rope_theta=600000.0, norm_eps=1e-6, qk_norm=True, attention="block_causal", block_size=32,
        rotary_dim=64, n_experts=256, n_experts_per_token=8, expert_hidden=512, shared_expert_hidden=512,
        first_dense_layers=1, router_renormalize=True, router_score="sigmoid", router_expert_bias=True,
        router_groups=8, router_topk_groups=4, routed_scaling=2.5, mask_id=156895, eos_id=156892, pad_id=156892,
        family="llada2",
    ),
    "llada-moe-7b": dict(  # inclusionAI/LLaDA-MoE-7B-A1B-Base/-Instruct: 64 experts of 1024, top-8, qk-norm
        vocab_size=157184, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, max_seq_len=8192, rope_theta=50000.0,
        qk_norm=True, n_experts=64, n_experts_per_token=8, expert_hidden=1024, mask_id=156895, eos_id=156892,
        pad_id=156892, family="llada_moe",
    ),
}


def shape_config(name: str, **overrides: Any) -> ModelConfig:
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return ModelConfig(**{**SHAPES[name], **overrides})
