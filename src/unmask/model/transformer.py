"""The denoiser: a pre-norm Transformer (RMSNorm, RoPE, SwiGLU or a mixture of SwiGLU experts, GQA, optional
QK-norm).

One network serves three attention modes (config.attention):
  bidirectional  masked diffusion: every token sees every token
  causal         the autoregressive twin
  block_causal   block diffusion: causal across blocks of `block_size` positions, bidirectional inside

The mask is built from *positions*, not indices, so left-padded batches and KV-cached calls see the same
structure. With a `KVCache`, the call's K/V are written into the cache at `cache_start` and the queries
attend to the first `kv_len` cache slots: that one mechanism covers AR decoding, the prefix cache and the
dual cache of the decoding engine.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unmask.model.adapter import AdapterGate, adapt_linears, is_adapter_param
from unmask.model.config import ModelConfig
from unmask.model.quantize import quantize_model, tie_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op; in float32: bf16 sums of squares lose too much precision (the weight multiplies the
        # result rounded to x's dtype, as it always has)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [B, 1, T, rotary_dim] for integer positions [B, T]: cos, and sin signed for the rotated
    half ([-sin, sin]), so that apply_rope is one roll and two multiplies."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim))
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF Llama/Qwen/LLaDA convention): pairs are (i, i + rotary_dim/2), i.e.
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], computed as x * cos + roll(x) * signed sin. Tables
    narrower than the head (partial RoPE) rotate only the first rotary_dim features."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(rd // 2, dims=-1), sin).type_as(x)


class KVCache(nn.Module):
    """Preallocated K/V buffers for every layer plus the positions and validity of each slot.

    Slots are sequence indices of the (possibly left-padded) batch. `positions[b, s]` is the RoPE
    position of slot s and `valid[b, s]` is False for padding, which no query may attend to.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("positions", torch.arange(max_len, device=device).expand(batch, -1).clone(), persistent=False)
        self.register_buffer("valid", torch.ones(batch, max_len, device=device, dtype=torch.bool), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def set_layout(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        n = positions.shape[1]
        self.positions[:, :n] = positions
        self.valid[:, :n] = valid

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer], self.v[layer]


def layout_mask(config: ModelConfig, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """Which keys each query may see under the attention mode, from positions [B, Tq] and [B, Tk] or [Tk]:
    a boolean [B, Tq, Tk], or None when every pair may attend (bidirectional)."""
    if config.attention == "bidirectional":
        return None
    k = k_pos[:, None, :] if k_pos.dim() == 2 else k_pos[None, None, :]
    q = q_pos[:, :, None]
    if config.attention == "causal" or config.block_attention == "causal":
        return k <= q  # causal inside blocks too: block-causal with causal blocks is plain causal
    return k // config.block_size <= q // config.block_size


def build_attention_mask(
    config: ModelConfig,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    q_index: torch.Tensor | None = None,
    k_index: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, Tq, Tk] (True = may attend), or None when every pair may attend."""
    mask = layout_mask(config, q_pos, k_pos)
    if k_valid is not None and not bool(k_valid.all()):
        valid = k_valid[:, None, :].expand(-1, q_pos.shape[1], -1)
        mask = valid if mask is None else mask & valid
    if mask is None:
        return None
    # A padded query may have no key left: let every slot see itself so softmax never meets an empty row.
    if q_index is not None and k_index is not None:
        mask = mask | (k_index[None, None, :] == q_index[None, :, None])
    return mask[:, None]


GROUPED_SCORES = 1 << 22  # score elements (queries x keys x heads) up to which CPU attention is grouped_attention


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention on a CPU as two batched matmuls: q [B, T, H, D], k/v [B, KV, S, D] (the cache, float64),
    `bias` the additive mask [B*KV, T*G, S] (rows t-major, G = H/KV) or None; returns [B, T, H, D].

    Why: a decoding step's T is 1 (AR) to a window, and there SDPA's CPU kernel costs 70 µs at 64 keys and
    570 µs at 600 for one query (per layer), where these matmuls cost a few dozen. The queries of one KV
    head are stacked into one matrix, so GQA needs no repeated keys. Why float64: a row's result then
    does not depend on how many queries or keys share the call in any bit that survives rounding to the
    compute dtype, so a window's tokens are exactly those of one-at-a-time decoding (verify == AR)."""
    B, T, H, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    qg = q.view(B, T, KV, G, D).transpose(1, 2).reshape(B * KV, T * G, D).to(k.dtype)
    keys = k.reshape(B * KV, S, D).transpose(1, 2)
    if bias is None:
        scores = torch.bmm(qg, keys).mul_(D**-0.5)
    else:
        scores = torch.baddbmm(bias, qg, keys, alpha=D**-0.5)
    out = torch.bmm(scores.softmax(dim=-1), v.reshape(B * KV, S, D))
    return out.view(B, KV, T, G, D).transpose(1, 2).reshape(B, T, H, D).to(q.dtype)


def grouped_bias(mask: torch.Tensor | None, config: ModelConfig, dtype: torch.dtype, batch: int
                 ) -> torch.Tensor | None:
    """grouped_attention's additive bias from a boolean mask [B or 1, 1, T, S]: built once per forward pass."""
    if mask is None:
        return None
    B, (_, _, T, S) = batch, mask.shape
    G = config.n_heads // config.n_kv_heads
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    bias = bias.expand(B, 1, T, S)
    return bias.view(B, 1, T, 1, S).expand(B, config.n_kv_heads, T, G, S).reshape(B * config.n_kv_heads, T * G, S)


class Attention(nn.Module):
    fusable = ("wq", "wk", "wv")  # projections of one input that quantized weights run as one matmul

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.fused = None  # model/quantize.py FusedProjections, where set
        hd = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * hd, bias=config.attn_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * hd, bias=config.attn_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * hd, bias=config.attn_bias)
        self.wo = nn.Linear(config.n_heads * hd, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, cache_start: int, kv_len: int,
                bias: torch.Tensor | None = None):
        """`bias`: grouped_attention's mask for calls that take that path (Transformer.forward decides)."""
        B, T, _ = x.shape
        c = self.config
        q, k, v = self.fused(x) if self.fused is not None else (self.wq(x), self.wk(x), self.wv(x))
        q = q.view(B, T, c.n_heads, c.head_dim)
        k = k.view(B, T, c.n_kv_heads, c.head_dim)
        v = v.view(B, T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if bias is not None or (cache is not None and mask is None and grouped(x, c, kv_len)):
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, T, 1, D]: heads after positions here
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_all, v_all = cache.write(layer, cache_start, k.transpose(1, 2).to(cache.k.dtype),
                                       v.transpose(1, 2).to(cache.v.dtype))
            out = grouped_attention(q, k_all[:, :, :kv_len], v_all[:, :, :kv_len], bias)
            return self.wo(out.reshape(B, T, -1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache.write(layer, cache_start, k.to(cache.k.dtype), v.to(cache.v.dtype))
            k, v = k_all[:, :, :kv_len].to(q.dtype), v_all[:, :, :kv_len].to(q.dtype)
        is_causal = mask is None and cache is None and c.attention == "causal"
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=c.n_kv_heads != c.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def grouped(x: torch.Tensor, config: ModelConfig, kv_len: int) -> bool:
    """Whether a cached call on `x` [B, T, ...] attending to `kv_len` keys takes grouped_attention (eager, on
    a CPU, scores that fit in a few dozen MB: every decoding step and the prompts that precede them)."""
    scores = x.shape[0] * x.shape[1] * config.n_heads * kv_len
    return x.device.type == "cpu" and scores <= GROUPED_SCORES and not torch.compiler.is_compiling()


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection."""

    fusable = ("w1", "w3")

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fused = None  # model/quantize.py FusedProjections, where set
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fused(x) if self.fused is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


COMPILED_DENSE_TOKENS = 256  # compiled MoE layers up to this many tokens (decoding windows) run dense


class MoEFeedForward(nn.Module):
    """Top-k mixture of SwiGLU experts (+ an optional shared expert every token goes through).

    Routing: softmax over all experts' router logits (in float32), keep the k largest probabilities (divided by
    their sum when config.router_renormalize), and add those experts' outputs weighted by them. LLaDA2-style
    variants (config.router_score "sigmoid", router_expert_bias, router_groups, routed_scaling) change only
    which k experts are chosen and their weights, all inside route(). Decoding sends
    a block of ~32 tokens through the layer, so instead of running every expert on every token (dense) or
    padding to a capacity, the (token, slot) pairs are sorted by expert once and only experts that received
    tokens run, each on its own rows; index_add_ scatters the weighted outputs back. One host sync per layer
    (the per-expert counts), kept out of torch.compile: a compiled decoding window runs every expert instead
    (dispatch_dense), so the step stays one static graph. Gradients reach the router through the kept
    probabilities.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.k, self.renormalize = config.n_experts_per_token, config.router_renormalize
        self.router = nn.Linear(config.dim, config.n_experts, bias=False)
        if config.router_expert_bias:  # a loaded buffer (no gradient), used only to choose experts
            self.register_buffer("router_bias", torch.zeros(config.n_experts))
        self.experts = nn.ModuleList(FeedForward(config.dim, config.expert_hidden) for _ in range(config.n_experts))
        if config.shared_expert_hidden:
            self.shared = FeedForward(config.dim, config.shared_expert_hidden)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), each [N, k], for tokens x [N, dim]."""
        c = self.config
        if c.router_score == "softmax":
            scores = self.router(x).float().softmax(dim=-1)
        else:  # sigmoid, on float32 logits as the published BailingMoeV2 / LLaDA2 gate computes them
            scores = F.linear(x.float(), self.router.weight.float()).sigmoid()
        choice = scores + self.router_bias.float() if c.router_expert_bias else scores  # selection only
        if c.router_groups:
            n = choice.shape[0]
            grouped = choice.view(n, c.router_groups, -1)
            best = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(c.router_topk_groups, dim=-1).indices
            keep = torch.zeros(n, c.router_groups, dtype=torch.bool, device=x.device).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, -1)
        experts = choice.topk(self.k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if c.routed_scaling != 1.0:
            weights = weights * c.routed_scaling
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        if torch.compiler.is_compiling() and x.shape[0] <= COMPILED_DENSE_TOKENS:
            out = self.dispatch_dense(x, weights, experts)
        else:
            out = self.dispatch_sparse(x, weights, experts)
        if hasattr(self, "shared"):
            out = out + self.shared(x)
        return out.view(shape)

    @torch.compiler.disable  # data-dependent per-expert counts: traced, they would recompile every step
    def dispatch_sparse(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Only the experts that received tokens run, each on its own rows."""
        order = experts.flatten().argsort()
        rows = order // self.k  # the token of each (token, slot) pair, grouped by expert
        slot_weights = weights.flatten()[order, None]
        counts = torch.bincount(experts.flatten(), minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                idx = rows[start : start + n]
                out.index_add_(0, idx, expert(x[idx]) * slot_weights[start : start + n])
                start += n
        return out

    def dispatch_dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by a routing matrix that is zero off the top-k: static
        shapes, so a compiled decoding step is one graph (CUDA graphs). A block of 32 tokens x 8 of 64
        experts reaches nearly every expert anyway, so the weight reads that bound a GPU step are the same."""
        combine = torch.zeros(x.shape[0], len(self.experts), dtype=weights.dtype, device=x.device)
        combine.scatter_(1, experts, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * combine[:, e : e + 1]
        return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if config.is_moe_layer(layer):
            self.feed_forward = MoEFeedForward(config)
        else:
            self.feed_forward = FeedForward(config.dim, config.ffn_hidden)

    def forward(self, x, cos, sin, mask, cache, layer, cache_start, kv_len, bias=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, cache_start, kv_len, bias)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            tie_head(self.output, self.tok_embeddings)
        self.adapter_gate = AdapterGate()
        if config.adapter_rank:
            adapt_linears(self.layers, config.adapter_rank, config.adapter_alpha, self.adapter_gate)
            self.mask_embedding = nn.Parameter(torch.zeros(config.dim))
        if config.quantization:  # a quantized checkpoint: build the stored layout, then load into it
            quantize_model(self, config.quantization)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the norms' (quantized layers and tables store their own)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def init_weights(self, seed: int | None = None) -> "Transformer":
        """GPT-2 style init; residual projections scaled down by depth."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            if is_adapter_param(name):
                continue  # adapters start at zero (lora_b) around whatever the base weights are
            if p.dim() == 1:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.ones_(p)
                continue
            s = std / (2 * self.config.n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * s)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_start: int = 0,
        kv_len: int | None = None,
        attn_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for `input_ids` [B, T].

        positions  RoPE positions [B, T] (default 0..T-1, or the cache's positions of these slots)
        key_valid  [B, T] False for padding (ignored with a cache: the cache's `valid` is used)
        cache      write this call's K/V at slots [cache_start, cache_start+T), attend to slots [0, kv_len)
        attn_mask  explicit boolean mask [B or 1, 1, T, kv_len] replacing the one built from the mode

        With config.logits_shift (AR-initialised models such as Dream) the logits are realigned so that
        output i predicts token i: output i is read from the network's output i-1 (output 0 from itself).
        """
        B, T = input_ids.shape
        c = self.config
        if cache is not None:
            kv_len = kv_len if kv_len is not None else cache_start + T
            if cache_start + T > cache.max_len or kv_len > cache.max_len:
                raise ValueError(f"cache of {cache.max_len} slots is too small for slots up to {max(cache_start + T, kv_len)}")
            if positions is None:
                positions = cache.positions[:, cache_start : cache_start + T]
            k_pos, k_valid = cache.positions[:, :kv_len], cache.valid[:, :kv_len]
            q_index = torch.arange(cache_start, cache_start + T, device=input_ids.device)
            k_index = torch.arange(kv_len, device=input_ids.device)
        else:
            if positions is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, -1)
            k_pos, k_valid = positions, key_valid
            q_index = k_index = torch.arange(T, device=input_ids.device)
            kv_len = T
        if T > c.max_seq_len or kv_len > c.max_seq_len:
            raise ValueError(f"sequence of {max(T, kv_len)} tokens exceeds the model context of {c.max_seq_len}")
        if attn_mask is not None:
            mask = attn_mask
        else:
            mask = build_attention_mask(c, positions, k_pos, k_valid, q_index, k_index)
        cos, sin = rope_cos_sin(positions, c.rotary_dim or c.head_dim, c.rope_theta)
        h = self.tok_embeddings(input_ids).to(self.dtype)  # a no-op unless the table is quantized
        if c.adapter_rank:
            is_mask = (input_ids == c.mask_id)[..., None]
            h = torch.where(is_mask, self.mask_embedding.to(h.dtype), h)
            self.adapter_gate.value = is_mask if c.adapter_tokens == "masks" else None
            eager_cpu = input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
            sparse = eager_cpu and c.adapter_tokens == "masks" and not torch.is_grad_enabled()
            self.adapter_gate.rows = is_mask.view(-1).nonzero().squeeze(1) if sparse else None
        bias = grouped_bias(mask, c, cache.k.dtype, B) if cache is not None and grouped(input_ids, c, kv_len) else None
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i, cache_start, kv_len, bias)
        h = self.norm(h)
        if return_hidden:
            return h
        logits = self.output(h)
        if c.logits_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """K/V buffers in the compute dtype; float64 on a CPU, where attention runs grouped_attention's
        float64 matmuls straight from the cache (no conversion per layer)."""
        default = torch.float64 if self.device.type == "cpu" else self.dtype
        return KVCache(self.config, batch, max_len, device=self.device, dtype=dtype or default)
