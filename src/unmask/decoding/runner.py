"""The engine's forward passes: one call runs the model for every active request and returns their logits.

The runner owns what the passes need and nothing else: the K/V cache (grown to the batch and the longest
canvas; cache.py explains its layout), the compiled forward and its static shapes (kv_bucket; the cache
buffers declared static for CUDA graphs), the masks and slot tables of the last refresh and window call
(kept while the batch's windows stay the same), and the prefix store's fills (decoding/prefix.py). Each
request says what it needs — a refresh of slots [0, visible) or its window — and the runner batches the
refreshes into one call and the windows into another.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from unmask.decoding.cache import CacheView, attention_mask, grow_cache
from unmask.decoding.prefix import PrefixStore
from unmask.decoding.request import Request
from unmask.model.transformer import Transformer


def kv_bucket(n: int, max_seq_len: int, smallest: int = 128) -> int:
    """The key/value length a compiled engine attends over for canvases of up to `n` tokens: the next power
    of two (at least `smallest`, at most the context). Graphs are compiled per shape, so prompts of any
    length share a handful of them instead of compiling one per length (dynamo gives up after 8 and
    falls back to eager); the padded keys are masked out."""
    bucket = smallest
    while bucket < n:
        bucket *= 2
    return max(n, min(bucket, max_seq_len))


class Runner:
    """Forward passes for up to `max_batch` requests, each in its own cache row (its Slot's row).

    compile   torch.compile the model (see Engine); False runs it eagerly
    prefix    a PrefixStore (uncompiled block_causal models) or None
    """

    def __init__(self, model: Transformer, max_batch: int, compile: bool | str = False,
                 prefix: PrefixStore | None = None):
        self.model, self.config, self.max_batch, self.prefix = model, model.config, max_batch, prefix
        self.device = model.output.weight.device
        self.cache = None
        self.static_shapes = bool(compile)
        self.forward: Callable = model
        self._memo: dict[str, tuple] = {}
        if compile:
            # on a GPU a 32-token window step is hundreds of small kernels: without CUDA graphs
            # ("reduce-overhead") it is bound by their launches, not by the weight reads
            mode = compile if isinstance(compile, str) else ("reduce-overhead" if self.device.type == "cuda" else None)
            self.forward = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)

    def admit(self, r: Request) -> None:
        """Plan a new request's first pass around the prefix store, where one applies: the stored leading model
        blocks of its canvas are copied in (logits(), once the cache is sized) and its first pass starts after
        them, as an entry window; the complete model blocks before its first mask are stored after that pass."""
        if self.prefix is None or not r.plan.blocks or r.options.cache == "none" or r.options.cache_refresh:
            return
        bs = self.config.block_size
        complete = r.plan.blocks[0][0] // bs  # model blocks wholly before the first masked position
        found = self.prefix.lookup(r.host, complete)
        if found:
            r.slot.prefix_fill = found
            r.slot.first_window = (min(len(found) * bs, r.window[0]), r.window[1])
        r.slot.prefix_new = range(len(found), complete)

    def logits(self, reqs: list[Request]) -> torch.Tensor:
        """Logits [R, L, V] of each request's block positions (rows in `reqs`' order, padded to the longest
        block). The mask token keeps its logit: Request.update never proposes it."""
        hidden = self.hidden(reqs)
        if len(reqs) == 1:
            h = hidden[reqs[0].id][None]
        else:
            h = torch.nn.utils.rnn.pad_sequence([hidden[r.id] for r in reqs], batch_first=True)
        return self.model.output(h)

    def hidden(self, reqs: list[Request]) -> dict[str, torch.Tensor]:
        """Hidden states [L, dim] at each request's logit sources (Request.src), by request id."""
        C = max(r.n for r in reqs)
        if self.static_shapes:
            C = kv_bucket(C, self.config.max_seq_len)
        cache = grow_cache(self.model, self.cache, self.max_batch, C + 1)  # +1: scratch slot for padding
        if cache is not self.cache and self.static_shapes:
            # The forward writes K/V in place; CUDA graphs only replay over inputs at fixed addresses,
            # so the buffers are declared static (as parameters are) instead of making cudagraphs bail out.
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        self.cache = cache
        bs = self.config.block_size
        for r in reqs:
            if r.slot.prefix_fill:
                for j, (k, v) in enumerate(r.slot.prefix_fill):
                    cache.k[:, r.slot.row, :, j * bs : (j + 1) * bs] = k
                    cache.v[:, r.slot.row, :, j * bs : (j + 1) * bs] = v
                r.slot.prefix_fill = None
        refresh = [r for r in reqs if r.needs_refresh()]
        window = [r for r in reqs if not r.needs_refresh()]
        hidden: dict[str, torch.Tensor] = {}
        if refresh:
            hidden.update(self._refresh(refresh, C))
        if window:
            hidden.update(self._window(window, C))
        for r in reqs:
            if r.slot.prefix_new:  # its first pass computed these prompt blocks: keep them for later requests
                for j in r.slot.prefix_new:
                    self.prefix.insert(r.host, j, cache.k[:, r.slot.row, :, j * bs : (j + 1) * bs],
                                       cache.v[:, r.slot.row, :, j * bs : (j + 1) * bs])
                r.slot.prefix_new = range(0)
        return hidden

    def _rows(self, reqs: list[Request]) -> slice | torch.Tensor:
        rows = [r.slot.row for r in reqs]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=self.device)

    def _refresh(self, reqs: list[Request], C: int) -> dict[str, torch.Tensor]:
        """Slots [0, visible) of each request, rewritten: one call over [0, C) (the longest visible, uncompiled)."""
        if not self.static_shapes:
            C = max(r.visible for r in reqs)
        key = ("refresh", C, tuple((r.slot.row, r.visible) for r in reqs))
        if self._memo.get("refresh", (None,))[0] != key:
            lengths = [r.visible for r in reqs]
            positions = torch.arange(C, device=self.device).expand(len(reqs), -1)
            q_real = positions < torch.tensor(lengths, device=self.device)[:, None]
            self._memo["refresh"] = (key, positions, attention_mask(self.config, positions, q_real, lengths, C))
        _, positions, mask = self._memo["refresh"]
        if len(reqs) == 1 and reqs[0].visible == C:
            tokens = reqs[0].inputs[None, :C]
        else:
            tokens = torch.stack([F.pad(r.inputs[: r.visible], (0, C - r.visible), value=self.config.pad_id)
                                  for r in reqs])
        view = CacheView(self.cache, self._rows(reqs), None, C)
        h = self.forward(tokens, positions=positions, cache=view, cache_start=0, kv_len=C, attn_mask=mask,
                         return_hidden=True)
        return {r.id: h[i, r.src] for i, r in enumerate(reqs)}

    def _window(self, reqs: list[Request], C: int) -> dict[str, torch.Tensor]:
        """Each request's step window, written in place at its own slots against its cached rest."""
        windows = [r.step_window() for r in reqs]
        key = ("window", C, tuple((r.slot.row, r.visible, w) for r, w in zip(reqs, windows)))
        if self._memo.get("window", (None,))[0] != key:
            W = max(max(e - s, r.plan.entry_width if r.entering else r.plan.window_width)
                    for r, (s, e) in zip(reqs, windows))
            slots = torch.full((len(reqs), W), C, device=self.device)  # padding entries -> scratch slot C
            positions = torch.zeros((len(reqs), W), dtype=torch.long, device=self.device)
            for i, (s, e) in enumerate(windows):
                slots[i, : e - s] = positions[i, : e - s] = torch.arange(s, e, device=self.device)
            q_real = slots < C
            mask = attention_mask(self.config, positions, q_real, [r.visible for r in reqs], C)
            self._memo["window"] = (key, W, positions, slots, mask)
        _, W, positions, slots, mask = self._memo["window"]
        if len(reqs) == 1 and W == windows[0][1] - windows[0][0]:
            s, e = windows[0]
            tokens = reqs[0].inputs[s:e][None]  # strides as the padded (stacked) path's: one compiled graph
        else:
            tokens = torch.stack([F.pad(r.inputs[s:e], (0, W - (e - s)), value=self.config.pad_id)
                                  for r, (s, e) in zip(reqs, windows)])
        view = CacheView(self.cache, self._rows(reqs), slots, C)
        h = self.forward(tokens, positions=positions, cache=view, cache_start=0, kv_len=C, attn_mask=mask,
                         return_hidden=True)
        # a drafting request's window may start inside its block: the rows before it are committed, unread
        return {r.id: h[i, (r.src - s).clamp_min(0)] for i, (r, (s, _)) in enumerate(zip(reqs, windows))}
