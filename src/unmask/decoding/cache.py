"""The engine's view of the model's KVCache: some batch rows, each writing its K/V at its own slots.

Layout: every request keeps its canvas in *natural order* in its cache row — slot i holds token i at RoPE
position i, slots [0, n) valid, the rest of the row invalid. There is no left padding: each row simply
ends where its canvas ends, and the attention mask (built here, once per block) hides the tail.

Two kinds of forward pass go through a view:
  refresh  the whole canvas, slots [0, C): rewrites every K/V of the rows (prefix/dual cache refresh);
           block_causal models stop at the current model block, as nothing after it can reach it
  window   only the current block's window (prefix: block to end; dual: the block), written *in place*
           at each row's own slots, attending to the cached rest of the row. Rows whose windows start at
           different slots share one call because `write` scatters per row; padding entries of a short
           window go to a scratch slot past the attended range.

The Transformer only needs `write`, `max_len`, `positions`, `valid` and the buffers' dtype from a cache, so
this view duck-types KVCache without touching the model code.
"""

from __future__ import annotations

import torch

from unmask.decoding.layout import layout_for
from unmask.model.config import ModelConfig
from unmask.model.transformer import KVCache, layout_mask


class _Nothing:
    """Indexes to None: stands in for the per-slot positions/valid the engine does not use."""

    def __getitem__(self, key):
        return None


_NOTHING = _Nothing()


class CacheView:
    """Rows `rows` of `cache`; the call's entry t of row r is written at slot `slots[r, t]`.

    `rows` is a slice when the rows are contiguous (no copies at all) or an index tensor.
    `slots` None means the call writes slots [cache_start, cache_start + T) of every row (refresh).
    """

    def __init__(self, cache: KVCache, rows: slice | torch.Tensor, slots: torch.Tensor | None, kv_len: int):
        self.cache, self.rows, self.slots = cache, rows, slots
        self.max_len = cache.max_len
        self.k, self.v = cache.k, cache.v  # dtype lookups only
        # The engine passes positions and attn_mask itself; the model would only read these to build a
        # mask when attn_mask is None (bidirectional, nothing to hide), where "no validity" is the truth
        # and avoids a host sync on `valid.all()`.
        self.positions = self.valid = _NOTHING

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.cache.k[layer], self.cache.v[layer]  # [B, H, S, D]
        if self.slots is None:
            end = start + k.shape[2]
            kb[self.rows, :, start:end] = k
            vb[self.rows, :, start:end] = v
        else:
            rows = self.rows
            if isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop, device=kb.device)
            # advanced indices around a slice put the broadcast index dims first: [R, T, H, D]
            kb[rows[:, None], :, self.slots] = k.transpose(1, 2)
            vb[rows[:, None], :, self.slots] = v.transpose(1, 2)
        return kb[self.rows], vb[self.rows]


def grow_cache(model, cache: KVCache | None, batch: int, max_len: int) -> KVCache:
    """A cache with at least `batch` rows and `max_len` slots, keeping the old contents."""
    if cache is not None and cache.k.shape[1] >= batch and cache.max_len >= max_len:
        return cache
    if cache is not None:
        batch, max_len = max(batch, cache.k.shape[1]), max(max_len, cache.max_len)
    new = model.new_cache(batch, 64 * -(-max_len // 64))  # round up: fewer regrowths, friendlier shapes
    if cache is not None:
        b, s = cache.k.shape[1], cache.max_len
        new.k[:, :b, :, :s] = cache.k
        new.v[:, :b, :, :s] = cache.v
    return new


def attention_mask(config: ModelConfig, q_pos: torch.Tensor, q_real: torch.Tensor, lengths: list[int],
                   kv_len: int) -> torch.Tensor | None:
    """Boolean mask [R, 1, T, kv_len] for queries at positions `q_pos` [R, T] over natural-order keys.

    Row r's keys are valid on slots [0, lengths[r]). Padding queries (`q_real` False) sit at position 0 and
    may see slot 0, so no softmax row is empty. Returns None when nothing needs masking (SDPA's fast path).
    """
    if not layout_for(config).masks_keys and min(lengths) >= kv_len:  # padding queries may see all
        return None
    k_pos = torch.arange(kv_len, device=q_pos.device)
    n = torch.tensor(lengths, device=q_pos.device)
    mask = (k_pos[None, None, :] < n[:, None, None]).expand(-1, q_pos.shape[1], -1)
    layout = layout_mask(config, q_pos, k_pos)
    if layout is not None:
        mask = mask & layout
    pad_q = ~q_real[:, :, None] & (k_pos[None, None, :] == 0)
    return (mask | pad_q)[:, None]
