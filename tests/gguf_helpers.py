"""Writing GGUF files the way llama.cpp's converter does: tiny models for the GGUF and adaptation tests."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from unmask.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|user|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())  # 12345", "héllo wörld ✓ 日本",
         "a<|endoftext|>b<|mask|>", "   spaces\t\ttabs\n\n\nnewlines"]


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (i, i + d/2) become neighbours."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, permute: bool) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's tensor names (experts stacked [n_expert, ...])."""
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = sd["output.weight"]
    for i in range(c.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for ours, theirs in (("attention_norm", "attn_norm"), ("ffn_norm", "ffn_norm")):
            out[b + theirs + ".weight"] = sd[p + ours + ".weight"]
        for ours, theirs in (("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"), ("wo", "attn_output")):
            for kind in ("weight", "bias"):
                t = sd.get(f"{p}attention.{ours}.{kind}")
                if t is None:
                    continue
                if permute and ours in ("wq", "wk"):
                    t = llama_cpp_permute(t, c.n_heads if ours == "wq" else c.n_kv_heads)
                out[f"{b}{theirs}.{kind}"] = t
        if c.qk_norm:
            out[b + "attn_q_norm.weight"] = sd[p + "attention.q_norm.weight"]
            out[b + "attn_k_norm.weight"] = sd[p + "attention.k_norm.weight"]
        if c.is_moe_layer(i):
            out[b + "ffn_gate_inp.weight"] = sd[p + "feed_forward.router.weight"]
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                out[f"{b}ffn_{theirs}_exps.weight"] = torch.stack(
                    [sd[f"{p}feed_forward.experts.{e}.{ours}.weight"] for e in range(c.n_experts)])
        else:
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                out[f"{b}ffn_{theirs}.weight"] = sd[f"{p}feed_forward.{ours}.weight"]
    return out


def vocab_metadata(tok: Tokenizer) -> tuple[list[str], list[str], list[int]]:
    """tokens in id order, merges as "a b", token types (CONTROL for special added tokens)."""
    id_to_tok = {i: t for t, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    tokens = [id_to_tok[i] for i in range(len(id_to_tok))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.hf.to_str())["model"]["merges"]]
    added = tok.hf.get_added_tokens_decoder()
    types = [int(gguf.TokenType.CONTROL if i in added and added[i].special else gguf.TokenType.NORMAL)
             for i in range(len(tokens))]
    return tokens, merges, types


def write_gguf(path: Path, model, tok: Tokenizer | None, arch: str = "llama", qtype: QT = QT.F32,
               permute: bool | None = None, pre: str = "gpt2", mask_id: int | None = None,
               raw: dict[str, tuple[np.ndarray, QT]] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A GGUF file of `model` in llama.cpp's layout; 2-D tensors in `qtype` (norms stay F32, as llama.cpp
    keeps them); `raw` replaces tensors with given bytes of a given type."""
    c = model.config
    permute = arch in ("llama", "llada") if permute is None else permute
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_license("apache-2.0")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if arch != "llama":
        w.add_causal_attention(False)
    if arch == "dream":
        w.add_diffusion_shift_logits(True)
    if c.n_experts:
        w.add_expert_count(c.n_experts)
        w.add_expert_used_count(c.n_experts_per_token)
        w.add_expert_feed_forward_length(c.expert_hidden)
    if tok is not None:
        tokens, merges, types = vocab_metadata(tok)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_bos_token_id(tok.eos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_chat_template(CHATML)
        if mask_id is not None:
            w.add_mask_token_id(mask_id)
    for name, t in gguf_tensors(model, permute).items():
        if name in drop:
            continue
        if raw and name in raw:
            data, rtype = raw[name]
            w.add_tensor(name, data, raw_dtype=rtype)
            continue
        arr = t.contiguous().numpy().astype(np.float32)
        if arr.ndim >= 2 and qtype != QT.F32:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, q, raw_dtype=None if qtype == QT.F16 else qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
