"""Prefix reuse for block_causal models: the K/V of finished prompt blocks, kept across requests.

In a block_causal model a model block attends only to itself and the blocks before it, so its K/V depend
on nothing but the tokens up to its end. The K/V one request computed for its prompt are therefore exact
for every later request whose canvas starts with the same tokens — a chat's system prompt and earlier
turns, a file being edited again, a batch of prompts with a shared preamble. The store keeps them per model
block, keyed by all the tokens up to that block's end (so a hit is an exact match, never a hash collision),
and evicts the least recently used block first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixStore:
    def __init__(self, capacity_blocks: int, block_size: int):
        self.capacity, self.block_size = capacity_blocks, block_size
        self._blocks: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.reused = 0  # blocks taken from the store
        self.computed = 0  # blocks put in it

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, tokens: list[int], limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored (K, V) [layers, kv heads, block, head dim] of the leading model blocks of `tokens`,
        in order, at most `limit` of them: as many as match."""
        found = []
        for j in range(limit):
            key = tuple(tokens[: (j + 1) * self.block_size])
            entry = self._blocks.get(key)
            if entry is None:
                break
            self._blocks.move_to_end(key)
            found.append(entry)
        self.reused += len(found)
        return found

    def insert(self, tokens: list[int], block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the K/V of model block `block` of `tokens` (copies: the cache row will be rewritten)."""
        key = tuple(tokens[: (block + 1) * self.block_size])
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        self._blocks[key] = (k.clone(), v.clone())
        self.computed += 1
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
