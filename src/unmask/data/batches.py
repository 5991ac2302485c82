"""Training batches with a resumable position.

`IndexSampler` walks a fresh seeded permutation of the items each epoch; its whole state is (epoch, cursor),
so a checkpoint stores two integers and `--resume` continues with exactly the next batch. Each step takes
one *global* batch and every rank slices its own rows, so the data a step sees does not depend on the number
of processes (DDP on 2 processes trains on the same sequences as 1 process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from unmask.data.shards import ShardError, TokenShard
from unmask.errors import UnmaskError
from unmask.tokenizer import Tokenizer


class DataError(UnmaskError, ValueError):
    pass


class IndexSampler:
    def __init__(self, n: int, seed: int):
        if n < 1:
            raise DataError("no training examples")
        self.n, self.seed = n, seed
        self.epoch = self.cursor = 0
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` items as (epochs, indices)."""
        epochs, indices = [], []
        while count:
            k = min(count, self.n - self.cursor)
            indices.append(self.permutation(self.epoch)[self.cursor : self.cursor + k])
            epochs.append(np.full(k, self.epoch))
            self.cursor += k
            count -= k
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return np.concatenate(epochs), np.concatenate(indices)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise DataError(f"the checkpoint's data has {state['n']} items, the current data {self.n}: "
                            "resume needs the same data and seq_len")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class WindowData:
    """Fixed-length windows of a token shard; each epoch shifts the window grid by a seeded offset so
    multi-epoch training sees new cut points. `extra` tokens overlap the next window (1 for the AR shift)."""

    def __init__(self, shard: TokenShard, seq_len: int, extra: int = 0, seed: int = 0):
        self.shard, self.seq_len, self.extra, self.seed = shard, seq_len, extra, seed
        self.n = (shard.n_tokens - extra - seq_len + 1) // seq_len
        if self.n < 1:
            raise ShardError(f"token shard {shard.path} has {shard.n_tokens} tokens, too few for one "
                             f"sequence of {seq_len + extra}")

    def offset(self, epoch: int) -> int:
        return 0 if epoch == 0 else int(np.random.default_rng([self.seed, epoch, 7]).integers(self.seq_len))

    def get(self, epochs: np.ndarray, indices: np.ndarray) -> dict[str, torch.Tensor]:
        span = self.seq_len + self.extra
        rows = [np.asarray(self.shard.tokens[s : s + span], dtype=np.int64)
                for s in (self.offset(int(e)) + int(i) * self.seq_len for e, i in zip(epochs, indices))]
        return {"input_ids": torch.from_numpy(np.stack(rows))}


class SFTData:
    """prompt/answer pairs (or chat `messages`) as fixed-length rows: prompt + answer + EOS, padded with EOS.
    The prompt is never masked; the answer and the EOS padding after it are (that is how a model learns to stop)."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_len: int):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"no such SFT file: {path}")
        rows, prompt_lens, self.skipped = [], [], 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    prompt, answer = _prompt_answer(json.loads(line), tokenizer)
                except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                    raise DataError(f"{path}:{lineno}: expected {{prompt, answer}} or {{messages}} ({e})") from None
                p = tokenizer.encode(prompt)
                if len(p) >= seq_len:
                    self.skipped += 1
                    continue
                ids = (p + tokenizer.encode(answer) + [tokenizer.eos_id])[:seq_len]
                rows.append(ids + [tokenizer.eos_id] * (seq_len - len(ids)))
                prompt_lens.append(len(p))
        if not rows:
            raise DataError(f"{path}: no example whose prompt fits in seq_len {seq_len}")
        self.ids = torch.tensor(rows, dtype=torch.long)
        self.prompt_len = torch.tensor(prompt_lens, dtype=torch.long)
        self.n = len(rows)

    def get(self, epochs: np.ndarray, indices: np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return {"input_ids": self.ids[idx], "prompt_len": self.prompt_len[idx]}


def _prompt_answer(record: dict, tokenizer: Tokenizer) -> tuple[str, str]:
    if "messages" in record:
        messages = record["messages"]
        if messages[-1]["role"] != "assistant":
            raise KeyError("the last message must be the assistant's answer")
        return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True), messages[-1]["content"]
    return record["prompt"], record["answer"]
