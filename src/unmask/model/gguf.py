"""GGUF checkpoints (llama.cpp's single-file format): read one into our Transformer and tokenizer.

    read_gguf(path)         -> GGUFCheckpoint(config, tensors in our names as float32, tokenizer, metadata)
    load_gguf_model(path)   -> Transformer (built on meta, tensors assigned; tied head when no output.weight)
    load_gguf(path)         -> (Transformer, Tokenizer, metadata) from one read of the file
    convert_gguf(path, out) -> our model folder (config.json, model.safetensors, tokenizer files), atomically
    cached_folder(path)     -> a converted folder kept under $UNMASK_CACHE/gguf/<sha256[:16]>
                               (default ~/.cache/unmask/gguf/...), converted on first use
                               (unmask.pipeline.load_gguf_cached loads a Pipeline from it)
    file_sha256(path)       -> hex digest, streamed in 1 MiB chunks

Architectures (`general.architecture`): llama (the causal twin: attention "causal", no mask token, so the mask
id is the EOS id), llada (bidirectional), llada-moe (bidirectional, a mixture of experts: `{arch}.expert_count`,
`expert_used_count`, `expert_feed_forward_length`; experts stored stacked as blk.{i}.ffn_{gate,up,down}_exps
[n_expert, ...] and split into experts.{e}) and dream (bidirectional, Qwen2 attention biases, shifted logits).
Hyperparameters come from `{arch}.*` keys; `{arch}.attention.causal` and `diffusion.shift_logits` win over the
architecture's defaults when a file states them; the mask id is `tokenizer.ggml.mask_token_id` when present,
else the family's published id (LLaDA 126336, LLaDA-MoE 156895, Dream 151666).

Q/K rows. llama.cpp's converter permutes the rows of Q and K for its interleaved ("normal") RoPE:
per head `w.reshape(n_head, 2, d_head/2, in).swapaxes(1, 2)` (K with the KV head count). It does this for
llama (LlamaModel) and llada (LLaDAModel.undo_permute = True, conversion/llada.py); LLaDA-MoE and Dream (Qwen2)
run NeoX-style RoPE in llama.cpp and are written unpermuted. Our RoPE is rotate-half, so for llama and llada
the permutation is undone here: `w.reshape(n_head, d_head/2, 2, in).swapaxes(1, 2)`.

Dequantization goes through gguf.GGUFReader and gguf.quants.dequantize for the types in SUPPORTED_TYPES;
other types (IQ*, TQ*, MXFP4, ...) are refused naming the type and the tensor. GGUF shapes list the fastest
dimension first, so a tensor's torch shape is its GGUF shape reversed.

Tokenizer: `tokenizer.ggml.model` "gpt2" (byte-level BPE from tokens + merges) rebuilt with the `tokenizers`
library; the pre-tokenizer follows `tokenizer.ggml.pre` (PRE_TOKENIZERS; an unknown name falls back to GPT-2's
with a warning, as llama.cpp falls back to its default). Tokens of type CONTROL are added as special tokens,
USER_DEFINED ones as added (atomic, non-special) tokens, which is how llama.cpp's converter classified them.

Load times measured here (SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB; 2 CPU cores shared with a training job, so
+-30 %; torch 2.13, gguf 0.19), two runs each:
    GGUFReader parsing the file                 2.1 s  (it walks the 98k tokenizer strings and merges in Python)
    dequantizing its 272 tensors                1.0-1.6 s
    load_gguf_model / unmask.load(file.gguf)    2.8-5.0 s  (parse + dequantize + assign; + tokenizer for load)
    load_gguf_cached, first call                4.0-4.8 s  (the above + writing 515 MB of float32 safetensors)
    load_gguf_cached, later calls               0.17 s     (sha256 of the file 0.07 s + mmap of the folder)
The same file, loaded here: perplexity 6.81 on the first 512 tokens of CPython 3.11's json/__init__.py (no
BOS), and greedy decoding of "def fibonacci(n):\n" writes the recursive function (tests/model/test_gguf.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from unmask.io import atomic_write_text
from unmask.model.config import ConfigError, ModelConfig
from unmask.model.families import Family
from unmask.model.quantize import QuantizedEmbedding, QuantizedLinear, scheme_named
from unmask.model.transformer import Transformer
from unmask.model.weights import CheckpointError, _check_memory, assign_weights, empty_model, save_model
from unmask.tokenizer import QWEN2_SPLIT, Tokenizer, _added_special

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUFFIX = ".gguf"
SOURCE_FILE = "gguf_source.json"  # written into converted folders: where the weights came from

SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                   QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)

# architecture -> (family name, attention, logits_shift, default mask id or None = the EOS id, permuted Q/K)
ARCHITECTURES: dict[str, tuple[str, str, bool, int | None, bool]] = {
    "llama": ("llama", "causal", False, None, True),
    "llada": ("llada", "bidirectional", False, 126336, True),
    "llada-moe": ("llada_moe", "bidirectional", False, 156895, False),
    "dream": ("dream", "bidirectional", True, 151666, False),
}

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> how to split text before byte-level BPE
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BAILING_SPLIT = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)"
                 r"|\s+")
PRE_TOKENIZERS = {
    "gpt2": ("default", "gpt-2", "phi-2", "mellum", "exaone4", "gpt2"),
    "digits": ("smollm", "starcoder", "refact"),  # each digit its own piece, then GPT-2's split
    "qwen2": ("qwen2", "deepseek-r1-qwen", "megrez", "kormo"),
    "llama3": ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"),
    "bailing": ("llada-moe", "bailingmoe", "bailingmoe2"),
}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be loaded: the message names the file and the problem."""


@dataclass
class GGUFCheckpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # our parameter names, float32
    tokenizer: Tokenizer
    metadata: dict[str, Any] = field(default_factory=dict)  # architecture, name, license, chat_template, ...


def is_gguf(path: str | Path | None) -> bool:
    """A path naming a GGUF file (by its suffix): what load_model / read_config / unmask.load route here."""
    return path is not None and str(path).lower().endswith(SUFFIX)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- reading -------------------------------------------------------------------------------------------
def check_header(path: str | Path) -> Path:
    """Cheap checks (exists, a file, GGUF magic) before anything parses or hashes it."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFError(f"not a GGUF file (a folder): {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return path


class _File:
    """An opened GGUF file: metadata accessors and the tensors by name."""

    def __init__(self, path: str | Path):
        self.path = path = check_header(path)
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # short reads surface as ValueError/IndexError from numpy deep in the parser
            raise GGUFError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from None
        size = path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{path} is truncated: tensor {t.name!r} needs bytes up to {t.data_offset + t.n_bytes:,}, "
                                f"the file has {size:,}")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(self.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise GGUFError(f"{self.path} is corrupt: cannot read metadata {key!r}: {e}") from None

    def arch_key(self, name: str, default: Any = None, required: bool = False) -> Any:
        value = self.get(f"{self.arch}.{name}", None)
        if value is None:
            if required:
                raise GGUFError(f"{self.path}: metadata {self.arch}.{name} is missing")
            return default
        return value

    def metadata(self) -> dict[str, Any]:
        types = Counter(t.tensor_type.name for t in self.reader.tensors)
        meta = {
            "architecture": self.arch,
            "name": self.get("general.name"),
            "license": self.get("general.license"),
            "chat_template": self.get("tokenizer.chat_template"),
            "tokenizer_model": self.get("tokenizer.ggml.model"),
            "tokenizer_pre": self.get("tokenizer.ggml.pre"),
            "file_type": self.get("general.file_type"),
            "tensor_types": dict(sorted(types.items())),
            "file": str(self.path),
        }
        for key in ("basename", "organization", "finetune", "size_label", "quantized_by"):
            if (value := self.get(f"general.{key}")) is not None:
                meta[key] = value
        return meta


def _uniform(file: _File, key: str, value: Any) -> int:
    """Per-layer arrays (some converters write head counts per layer): only one value for all is loadable."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"{file.path}: {file.arch}.{key} differs across layers ({value[:4]}…), which unmask "
                            "cannot express")
        value = value[0]
    return int(value)


def _config(file: _File) -> ModelConfig:
    arch = file.arch
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file.path}: unsupported GGUF architecture {arch!r} (general.architecture); unmask loads "
                        f"{', '.join(ARCHITECTURES)}")
    family, attention, shift, mask_default, _ = ARCHITECTURES[arch]
    scaling = file.arch_key("rope.scaling.type")
    factor = file.arch_key("rope.scaling.factor")
    if scaling not in (None, "none") and not (scaling == "linear" and factor in (None, 1.0)):
        raise GGUFError(f"{file.path}: {arch}.rope.scaling.type is {scaling!r}; only plain RoPE is implemented")
    if "rope_freqs.weight" in file.tensors:
        raise GGUFError(f"{file.path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, e.g. Llama 3.1 "
                        "scaling) is not implemented")
    emb = file.tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{file.path}: no token_embd.weight tensor")
    dim = int(file.arch_key("embedding_length", required=True))
    n_layers = int(file.arch_key("block_count", required=True))
    n_heads = _uniform(file, "attention.head_count", file.arch_key("attention.head_count", required=True))
    n_kv = _uniform(file, "attention.head_count_kv", file.arch_key("attention.head_count_kv", n_heads))
    head_dim = int(file.arch_key("attention.key_length", dim // n_heads))
    if int(file.arch_key("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{file.path}: attention.value_length differs from key_length, which unmask cannot express")
    rope_dim = int(file.arch_key("rope.dimension_count", head_dim))
    vocab = int(emb.shape[1])  # GGUF [dim, vocab]: the embedding rows decide, not a vocab_size key
    causal = file.arch_key("attention.causal")
    if causal is not None:
        attention = "causal" if causal else "bidirectional"
    shift = bool(file.get("diffusion.shift_logits", shift))
    eos = file.get("tokenizer.ggml.eos_token_id")
    eos = int(eos) if eos is not None else (mask_default if mask_default is not None else 0)
    mask = file.get("tokenizer.ggml.mask_token_id")
    mask = int(mask) if mask is not None else (mask_default if mask_default is not None else eos)
    pad = file.get("tokenizer.ggml.padding_token_id")
    bos = file.get("tokenizer.ggml.bos_token_id")
    moe: dict[str, Any] = {}
    n_experts = int(file.arch_key("expert_count", 0) or 0)
    if n_experts:
        gating = int(file.arch_key("expert_gating_func", 1))
        if gating not in (1, 2):
            raise GGUFError(f"{file.path}: {arch}.expert_gating_func {gating} is not softmax (1) or sigmoid (2)")
        if file.arch_key("expert_group_count"):
            raise GGUFError(f"{file.path}: {arch}.expert_group_count (grouped routing) is not implemented for GGUF")
        shared = int(file.arch_key("expert_shared_count", 0) or 0)
        shared_hidden = 0
        if shared:
            shared_hidden = int(file.arch_key("expert_shared_feed_forward_length", 0) or 0) * shared
            if not shared_hidden:  # some converters store only the tensor
                shexp = file.tensors.get(f"blk.{n_layers - 1}.ffn_up_shexp.weight")
                shared_hidden = int(shexp.shape[1]) if shexp is not None else 0
        moe = dict(
            n_experts=n_experts, n_experts_per_token=int(file.arch_key("expert_used_count", required=True)),
            expert_hidden=int(file.arch_key("expert_feed_forward_length", required=True)),
            shared_expert_hidden=shared_hidden,
            first_dense_layers=int(file.arch_key("leading_dense_block_count", 0) or 0),
            router_renormalize=bool(file.arch_key("expert_weights_norm", False)),
            router_score="sigmoid" if gating == 2 else "softmax",
            router_expert_bias=f"blk.{n_layers - 1}.exp_probs_b.bias" in file.tensors,
            routed_scaling=float(file.arch_key("expert_weights_scale", 1.0) or 1.0),
        )
    ffn = file.arch_key("feed_forward_length")
    if ffn is None and (not n_experts or moe.get("first_dense_layers")):
        raise GGUFError(f"{file.path}: metadata {arch}.feed_forward_length is missing")
    try:
        return ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            ffn_hidden=_uniform(file, "feed_forward_length", ffn) if ffn is not None else None,
            max_seq_len=int(file.arch_key("context_length", 2048)),
            rope_theta=float(file.arch_key("rope.freq_base", 10000.0)),
            norm_eps=float(file.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
            qk_norm="blk.0.attn_q_norm.weight" in file.tensors,
            attn_bias="blk.0.attn_q.bias" in file.tensors,
            tie_embeddings="output.weight" not in file.tensors,
            attention=attention, logits_shift=shift,
            rotary_dim=None if rope_dim == head_dim else rope_dim,
            mask_id=mask, eos_id=eos, pad_id=int(pad) if pad is not None else eos,
            bos_id=int(bos) if bos is not None else None, family=family, **moe,
        )
    except ConfigError as e:
        raise GGUFError(f"{file.path}: the metadata describes no valid model: {e}") from None


# GGUF tensor name templates ("{}" = layer) -> ours
_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_q.bias": "layers.{}.attention.wq.bias",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_k.bias": "layers.{}.attention.wk.bias",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_v.bias": "layers.{}.attention.wv.bias",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.attn_q_norm.weight": "layers.{}.attention.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "layers.{}.attention.k_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_gate_inp.weight": "layers.{}.feed_forward.router.weight",
    "blk.{}.exp_probs_b.bias": "layers.{}.feed_forward.router_bias",
    "blk.{}.ffn_gate_shexp.weight": "layers.{}.feed_forward.shared.w1.weight",
    "blk.{}.ffn_up_shexp.weight": "layers.{}.feed_forward.shared.w3.weight",
    "blk.{}.ffn_down_shexp.weight": "layers.{}.feed_forward.shared.w2.weight",
    # stacked experts [n_expert, ...]: split into experts.{e}
    "blk.{}.ffn_gate_exps.weight": "layers.{}.feed_forward.experts.{{}}.w1.weight",
    "blk.{}.ffn_up_exps.weight": "layers.{}.feed_forward.experts.{{}}.w3.weight",
    "blk.{}.ffn_down_exps.weight": "layers.{}.feed_forward.experts.{{}}.w2.weight",
}


def _our_name(name: str) -> str | None:
    if name in _NAMES:
        return _NAMES[name]
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        template = ".".join(["blk", "{}", *parts[2:]])
        if template in _NAMES:
            return _NAMES[template].format(parts[1])
    return None


def _dequantize(file: _File, t) -> torch.Tensor:
    if t.tensor_type not in SUPPORTED_TYPES:
        raise GGUFError(f"{file.path}: tensor {t.name!r} is quantised as {t.tensor_type.name}, which unmask does not "
                        f"load (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    try:
        if t.tensor_type == QT.F32:
            arr = np.array(t.data, dtype=np.float32)  # a copy: the reader's arrays are read-only views of the file
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise GGUFError(f"{file.path}: tensor {t.name!r} ({t.tensor_type.name}, shape {shape}) is corrupt: {e}") from None
    return torch.from_numpy(arr)


# GGUF's 4-bit blocks of 32: (block bytes, has a min). Q4_0: w = d * (q - 8); Q4_1: w = d * q + m.
Q4_BLOCKS = {QT.Q4_0: (18, False), QT.Q4_1: (20, True)}


@dataclass
class Q4Codes:
    """A Q4_0 / Q4_1 tensor as its 4-bit codes [out, in] (uint8, 0..15) and each block's scale and zero
    [out, in/32] in the int4 kernels' convention w = (q - 8) * scale + zero: what Int4Weights stores
    (model/quantize.py), read from the blocks without a float round trip."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    def rows(self, reorder: Callable[[torch.Tensor], torch.Tensor]) -> "Q4Codes":
        return Q4Codes(reorder(self.codes), reorder(self.scale), reorder(self.zero))


def _q4_codes(file: _File, t) -> Q4Codes:
    block_bytes, has_min = Q4_BLOCKS[t.tensor_type]
    out, k = (int(d) for d in reversed(t.shape.tolist()))
    try:
        raw = np.asarray(t.data).reshape(out, k // 32, block_bytes)
    except ValueError as e:
        raise GGUFError(f"{file.path}: tensor {t.name!r} ({t.tensor_type.name}) is corrupt: {e}") from None
    d = np.ascontiguousarray(raw[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(raw[..., 2:4]).view(np.float16)[..., 0].astype(np.float32) if has_min else -8 * d
    qs = raw[..., 4:] if has_min else raw[..., 2:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(out, k)  # low nibbles are elements 0..15
    return Q4Codes(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m + 8 * d))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) for our rotate-half RoPE."""
    head = w.shape[0] // n_head
    return w.reshape(n_head, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _iter_tensors(file: _File, config: ModelConfig, convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                  keep_q4: Callable[[str], bool] = lambda name: False) -> Iterator[tuple[str, torch.Tensor | Q4Codes]]:
    """(our name, tensor) for every tensor of the file, dequantized, un-permuted and split; `convert` runs on
    each before the next is read (so a bf16 load never holds the whole float32 model). Q4 tensors whose name
    `keep_q4` accepts come as their Q4Codes instead."""
    permuted = ARCHITECTURES[file.arch][4]
    for name, t in file.tensors.items():
        ours = _our_name(name)
        if ours is None:
            raise GGUFError(f"{file.path}: unexpected tensor {name!r} for a {file.arch} model")
        if t.tensor_type in Q4_BLOCKS and "{}" not in ours and keep_q4(ours):
            codes = _q4_codes(file, t)
            if permuted and ".attn_q." in name:
                codes = codes.rows(lambda x: _unpermute(x, config.n_heads))
            elif permuted and ".attn_k." in name:
                codes = codes.rows(lambda x: _unpermute(x, config.n_kv_heads))
            yield ours, codes
            continue
        w = _dequantize(file, t)
        if permuted and ".attn_q." in name:
            w = _unpermute(w, config.n_heads)
        elif permuted and ".attn_k." in name:
            w = _unpermute(w, config.n_kv_heads)
        if "{}" in ours:  # stacked experts
            for e in range(w.shape[0]):
                yield ours.format(e), convert(w[e].clone())
        else:
            yield ours, convert(w)


def _state_dict(file: _File, config: ModelConfig, device: torch.device, dtype: torch.dtype
                ) -> tuple[Transformer, dict[str, torch.Tensor]]:
    """The model on meta and its tensors. With config.quantization, the quantized modules' tensors come in
    their scheme's layout: Q4 blocks straight into int4 of groups of 32, anything else quantized from its
    float values (a tied table once, for the embedding and the head; an untied copy from the embedding)."""
    model, expected = empty_model(config)
    quantized = {name: m.scheme for name, m in model.named_modules()
                 if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and name + ".weight" in expected}
    int4_32 = scheme_named("int4-g32")
    state: dict[str, torch.Tensor] = {}
    embedding = None
    to_state = (lambda t: t.to(device=device, dtype=dtype)) if not quantized else (lambda t: t)
    for name, t in _iter_tensors(file, config, to_state, keep_q4=lambda n: quantized.get(n[: -len(".weight")]) is int4_32):
        if name not in expected:
            raise GGUFError(f"{file.path}: tensor for {name!r}, which a model with this metadata does not have")
        shape = tuple(t.codes.shape if isinstance(t, Q4Codes) else t.shape)
        module = name[: -len(".weight")]
        if shape != (implied := _float_shape(model, name, expected[name])):
            raise GGUFError(f"{file.path}: the metadata does not match the tensors: {name!r} has shape "
                            f"{shape}, the metadata implies {implied}")
        if name == "tok_embeddings.weight":
            embedding = t
        if module in quantized:
            scheme = quantized[module]
            weight, scale = (scheme.from_codes(t.codes, t.scale, t.zero) if isinstance(t, Q4Codes)
                             else scheme.quantize(t))
            state[name], state[module + ".weight_scale"] = weight.to(device), scale.to(device)
        else:
            state[name] = t.to(device=device, dtype=dtype)
    if "output" in quantized and "output.weight" not in state and embedding is not None:
        state["output.weight"], state["output.weight_scale"] = (x.to(device) for x in
                                                               quantized["output"].quantize(embedding))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GGUFError(f"{file.path}: tensors missing for {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return model, state


def _float_shape(model: Transformer, name: str, stored: torch.Size) -> tuple[int, ...]:
    """The shape of a tensor before a scheme stored it ([out, in] of a linear layer, [rows, dim] of a
    table): what the file's tensor must have."""
    m = model.get_submodule(name.removesuffix(".weight")) if name.endswith(".weight") else None
    if isinstance(m, QuantizedLinear):
        return m.out_features, m.in_features
    if isinstance(m, QuantizedEmbedding):
        return m.num_embeddings, m.embedding_dim
    return tuple(stored)


def _pre_tokenizer(pre: str | None, path: Path):
    """(normalizer or None, pre-tokenizer, ignore_merges) for llama.cpp's pre-tokenizer name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    def split(regex: str):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                        byte_level])

    kind = next((k for k, names in PRE_TOKENIZERS.items() if pre in names), None)
    if kind is None:
        log.warning("%s: unknown pre-tokenizer %r (tokenizer.ggml.pre); splitting text as GPT-2 does", path, pre)
        kind = "gpt2"
    if kind == "digits":  # HF SmolLM2 / StarCoder tokenizer.json: Digits(individual) then ByteLevel
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False
    if kind == "qwen2":
        return normalizers.NFC(), split(QWEN2_SPLIT), False
    if kind == "llama3":
        return None, split(LLAMA3_SPLIT), True
    if kind == "bailing":
        return None, split(BAILING_SPLIT), False
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _tokenizer(file: _File, config: ModelConfig) -> Tokenizer:
    tokens = file.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{file.path} has no tokenizer (tokenizer.ggml.tokens); unmask needs the vocabulary in the file")
    kind = file.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{file.path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    merges = file.get("tokenizer.ggml.merges") or []
    types = file.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated string keeps its first id, as the HF vocabulary would
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(f"{file.path}: tokenizer merge {m!r} is not two tokens")
        pairs.append((a, b))
    normalizer, pre, ignore_merges = _pre_tokenizer(file.get("tokenizer.ggml.pre"), file.path)
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception for merges naming unknown tokens
        raise GGUFError(f"{file.path}: the tokenizer's tokens and merges do not form a BPE model: {e}") from None
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre
    hf.decoder = decoders.ByteLevel()
    special, added = [], []
    for i, (tok, kind_) in enumerate(zip(tokens, types)):
        if vocab.get(tok) != i:
            continue
        if kind_ == gguf.TokenType.CONTROL:
            special.append(AddedToken(tok, special=True, normalized=False))
        elif kind_ == gguf.TokenType.USER_DEFINED:
            added.append(AddedToken(tok, special=False, normalized=False))
    if special:
        hf.add_special_tokens(special)
    if added:
        hf.add_tokens(added)
    return Tokenizer(hf, mask_id=config.mask_id, eos_id=config.eos_id, pad_id=config.pad_id, bos_id=config.bos_id,
                     chat_template=file.get("tokenizer.chat_template"), extra_special=_added_special(hf))


# --- public API ----------------------------------------------------------------------------------------
def gguf_family(file: _File) -> Family:
    """The Family that read_config reports for a GGUF file (its `name` is "gguf:<architecture>"); it matches
    no config.json, so detect_family never picks it for a folder."""
    return Family(name=f"gguf:{file.arch}", matches=lambda raw: False, to_config=lambda raw: _config(file))


def stores_q4(path: str | Path) -> bool:
    """Whether a GGUF file stores its layers' matrices in Q4_0 / Q4_1 blocks (what int4-g32 keeps as is).
    Answered from the converted folder where one exists, so a load does not parse the file twice."""
    path = check_header(path)
    if (cache_root() / f"{known_sha256(path)[:16]}-int4-g32" / "config.json").exists():
        return True
    file = _File(path)
    layers = [t for t in file.reader.tensors if t.name.startswith("blk.") and len(t.shape) >= 2]
    return bool(layers) and all(t.tensor_type in Q4_BLOCKS for t in layers)


def read_gguf_config(path: str | Path) -> tuple[ModelConfig, Family, dict[str, Any]]:
    """What checkpoints.read_config returns for a folder: (config, family, metadata), no tensors read."""
    file = _File(path)
    return _config(file), gguf_family(file), file.metadata()


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Config, float32 tensors in our names, tokenizer and metadata of a GGUF file."""
    file = _File(path)
    config = _config(file)
    tokenizer = _tokenizer(file, config)
    _, state = _state_dict(file, config, torch.device("cpu"), torch.float32)
    return GGUFCheckpoint(config=config, tensors=state, tokenizer=tokenizer, metadata=file.metadata())


def _device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:  # dequantized weights are float32; GPUs get bf16 (the quantisation error dwarfs its rounding)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    return device, dtype


def _quantized(config: ModelConfig, quantization: str | None) -> ModelConfig:
    return dataclasses.replace(config, quantization=quantization) if quantization else config


def load_gguf(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              quantization: str | None = None) -> tuple[Transformer, Tokenizer, dict[str, Any]]:
    """Model, tokenizer and metadata from one read of the file (unmask.load uses this). `quantization`
    (model/quantize.py) stores the layers that way; "int4-g32" keeps Q4_0 / Q4_1 blocks as they are."""
    file = _File(path)
    config = _quantized(_config(file), quantization)
    tokenizer = _tokenizer(file, config)
    device, dtype = _device_dtype(device, dtype)
    _check_memory(config, device, dtype)
    model, state = _state_dict(file, config, device, dtype)
    return assign_weights(model, state), tokenizer, file.metadata()


def load_gguf_model(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, quantization: str | None = None) -> Transformer:
    file = _File(path)
    config = _quantized(_config(file), quantization)
    device, dtype = _device_dtype(device, dtype)
    _check_memory(config, device, dtype)
    return assign_weights(*_state_dict(file, config, device, dtype))


def _write_folder(out: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Write a folder under a temporary name beside `out`, then rename it into place: a reader never sees
    a half-written folder. An existing non-empty `out` is kept unless `replace`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a folder gets what mkdir would give it
        write(tmp)
        if out.exists() and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            if not replace:
                raise GGUFError(f"{out} already exists (choose another folder or replace it with --force)")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _save(model: Transformer, tokenizer: Tokenizer, metadata: dict[str, Any], folder: Path,
          dtype: torch.dtype | None = None, sha256: str | None = None) -> None:
    save_model(model, folder, dtype=dtype)
    tokenizer.save(folder)
    source = {k: v for k, v in metadata.items() if k != "chat_template"}
    source["file"] = Path(metadata.get("file", "")).name
    if sha256:
        source["sha256"] = sha256
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def convert_gguf(path: str | Path, out: str | Path, dtype: torch.dtype | None = None, replace: bool = False) -> Path:
    """Write our folder layout for a GGUF file (what unmask.load reads), atomically. `dtype` None keeps
    the dequantized float32 values exactly."""
    model, tokenizer, metadata = load_gguf(path, device="cpu", dtype=torch.float32)
    out = Path(out)
    _write_folder(out, lambda tmp: _save(model, tokenizer, metadata, tmp, dtype), replace=replace)
    return out


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("UNMASK_CACHE"):
        return Path(os.environ["UNMASK_CACHE"]) / "gguf"
    return Path.home() / ".cache" / "unmask" / "gguf"


def known_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a 100 MB base is hashed once, not per load."""
    path = Path(path)
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = cache_root() / "sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if key not in memo:
        memo[key] = file_sha256(path)
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_file, json.dumps(memo, indent=1) + "\n")
        except OSError:  # a read-only cache only costs the hashing next time
            pass
    return memo[key]


STORED_LAYOUT = 2  # of quantized folders; 2: the tied table stored once, as int8 (model/quantize.py)


def cached_folder(path: str | Path, cache_dir: str | Path | None = None, quantization: str | None = None,
                  sha256: str | None = None) -> Path:
    """The converted folder of a GGUF file (keyed by its sha256 and the quantization of its layers),
    converting it on first use: float32, or stored as `quantization` (model/quantize.py; "int4-g32" keeps
    the file's Q4 blocks as they are, so the folder is about the file's size and loads in a blink)."""
    path = check_header(path)  # a clear error for a missing or non-GGUF file before hashing it
    sha = sha256 or known_sha256(path)
    folder = cache_root(cache_dir) / (sha[:16] + (f"-{quantization}-v{STORED_LAYOUT}" if quantization else ""))
    if (folder / "config.json").exists():
        return folder
    model, tokenizer, metadata = load_gguf(path, device="cpu", dtype=torch.float32 if not quantization else
                                           torch.bfloat16, quantization=quantization)
    try:
        _write_folder(folder, lambda tmp: _save(model, tokenizer, metadata, tmp, sha256=sha))
    except (GGUFError, OSError):
        if not (folder / "config.json").exists():  # not another process that finished first
            raise
    log.info("converted %s into %s", path, folder)
    return folder
