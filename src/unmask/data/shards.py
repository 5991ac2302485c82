"""Token shards: a flat numpy memmap of token ids plus a JSON sidecar.

    name.bin   uint16 when the vocabulary fits, else uint32; [EOS] doc1 [EOS] doc2 [EOS] ...
    name.json  {"dtype", "n_tokens", "n_bytes", "n_documents", "eos_id", "vocab_size", "tokenizer_sha256", ...}

Every document is preceded by EOS so its first token has a document-boundary context (for the AR twin) and
n_bytes (UTF-8 bytes of the source text) turns a summed NLL into bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unmask.errors import UnmaskError
from unmask.io import atomic_path, atomic_write_text
from unmask.tokenizer import Tokenizer


class ShardError(UnmaskError, ValueError):
    pass


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode("utf-8")).hexdigest()


def write_shard(texts: Iterable[str], tokenizer: Tokenizer, path: str | Path, batch_docs: int = 256,
                extra: dict | None = None) -> dict:
    """Tokenize `texts` into `path` (.bin) and its sidecar (.json), both written atomically."""
    path = Path(path)
    dtype = shard_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    n_tokens = n_bytes = n_docs = 0

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        def flush(batch: list[str]) -> None:
            nonlocal n_tokens, n_bytes, n_docs
            for ids in tokenizer.encode_batch(batch):
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                f.write(eos.tobytes())
                n_tokens += len(arr) + 1
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
            n_docs += len(batch)

        f.write(eos.tobytes())
        n_tokens += 1
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        f.flush()
    meta = {"format": "unmask-shard-v1", "dtype": dtype.name, "n_tokens": n_tokens, "n_bytes": n_bytes,
            "n_documents": n_docs, "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
            "tokenizer_sha256": tokenizer_digest(tokenizer), **(extra or {})}
    atomic_write_text(sidecar(path), json.dumps(meta, indent=2) + "\n")
    return meta


def sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


@dataclass
class TokenShard:
    path: Path
    meta: dict
    tokens: np.ndarray  # read-only memmap

    @classmethod
    def open(cls, path: str | Path) -> "TokenShard":
        path = Path(path)
        if not path.exists():
            raise ShardError(f"no such token shard: {path}")
        try:
            meta = json.loads(sidecar(path).read_text())
            dtype = np.dtype(meta["dtype"])
            n_tokens = int(meta["n_tokens"])
        except FileNotFoundError:
            raise ShardError(f"token shard {path} has no sidecar {sidecar(path).name}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"corrupt shard sidecar {sidecar(path)}: {e}") from None
        size = os.path.getsize(path)
        if size != n_tokens * dtype.itemsize:
            raise ShardError(f"corrupt token shard {path}: {size} bytes, the sidecar implies "
                             f"{n_tokens * dtype.itemsize} ({n_tokens} × {dtype.name})")
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
        return cls(path, meta, tokens)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_bytes(self) -> int:
        return int(self.meta["n_bytes"])

    def check_vocab(self, vocab_size: int) -> None:
        top = int(self.tokens.max()) if self.n_tokens else 0
        if top >= vocab_size:
            raise ShardError(f"token shard {self.path} holds id {top}, outside the model vocabulary of {vocab_size}")


def token_byte_lengths(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for special tokens), so bytes = lengths[ids].sum() exactly."""
    from tokenizers import pre_tokenizers

    size = max(size or 0, tokenizer.vocab_size)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # byte-level BPE: one char per byte
    special = set(tokenizer.special.values()) | {tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id}
    out = np.zeros(size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        tok = tokenizer.id_to_token(i)
        if tok is None:
            continue
        if all(ch in alphabet for ch in tok):
            out[i] = len(tok)
        else:
            out[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return out
