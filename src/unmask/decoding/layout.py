"""Attention layouts: what the decoding code needs to know about a model's attention mode, as one object.

A model attends in one of four ways (config.attention, config.block_attention): bidirectional, causal,
block-causal with bidirectional blocks (BD3-LM, Fast-dLLM v2) or block-causal with causal blocks (an adapted
AR model). The engine, its runner and the cache ask each the same questions — where blocks may be cut, which
slots a step recomputes, how far a refresh must reach, whether a finished block's K/V are exact for later
requests, whether drafting applies — and each layout answers them; `layout_for(config)` picks the one.

Windows are half-open slot ranges [start, end) of a canvas of `n` tokens; a block is a list of masked
positions. With shifted logits (config.logits_shift) a position's logit is the output of the slot before, so
every window starts one slot early.
"""

from __future__ import annotations

from unmask.model.config import ModelConfig


class AttentionLayout:
    """Bidirectional: every token sees every other one. A refresh covers the whole canvas; a prefix-cache
    window runs from the block to the canvas end, a dual-cache window is the block alone."""

    name = "bidirectional"
    diffusion = True  # the diffusion engine decodes it (causal models decode with decoding/ar.py)
    prefix_reuse = False  # a finished block's K/V are exact for any canvas that starts with the same tokens
    drafting = False  # drafting policies (verify) read the model's look-ahead: causal inside blocks and shifted
    masks_keys = False  # the layout alone hides keys from queries (attention_mask can never be None)
    block_causal = False  # model blocks: a block sees itself and the blocks before it (training feeds [x_t, x_0])
    left_to_right = False  # clean text is read causally: a token never sees what follows it

    def __init__(self, block_size: int, logits_shift: bool):
        self.block_size, self.shift = block_size, int(logits_shift)

    def aligned(self, a: int, b: int) -> bool:
        """May one decoding block hold masked positions a < b? (Not across a model block where that matters.)"""
        return True

    def block_window(self, blk: list[int], n: int, cache: str) -> tuple[int, int]:
        """The slots a window step over block `blk` recomputes (`cache`: the request's "prefix" or "dual")."""
        start = max(blk[0] - self.shift, 0)
        return start, n if cache == "prefix" else blk[-1] + 1

    def entry_window(self, window: tuple[int, int], previous: list[int]) -> tuple[int, int] | None:
        """A later block's first window, given its own `window` and the block before it; None: that step
        refreshes the whole canvas instead."""
        return None

    def visible(self, window: tuple[int, int], n: int, static_shapes: bool) -> int:
        """Slots [0, visible) can influence the block: a refresh recomputes only those."""
        return n

    @property
    def next_token(self) -> bool:
        """The logits at a slot predict the token after it (an AR model, or an adapted one)."""
        return not self.diffusion or self.drafting

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size}, shift={bool(self.shift)})"


class Causal(AttentionLayout):
    """Every token sees itself and what precedes it: an AR model, decoded by decoding/ar.py, not the engine."""

    name = "causal"
    diffusion = False
    masks_keys = True
    left_to_right = True


class BlockCausal(AttentionLayout):
    """Model blocks of block_size tokens; a block sees itself and the blocks before it, bidirectionally inside.
    A decoding block never crosses a model block and its window covers the whole model block, so prefix and
    dual cache are the same exact window; nothing after that model block can reach it, so refreshes stop at
    its end, and a later block's first window widens back over the model block of the block before."""

    name = "block_causal"
    prefix_reuse = True
    masks_keys = True
    block_causal = True

    def aligned(self, a: int, b: int) -> bool:
        return a // self.block_size == b // self.block_size

    def block_window(self, blk: list[int], n: int, cache: str) -> tuple[int, int]:
        bs = self.block_size
        start = min(max(blk[0] - self.shift, 0), blk[0] // bs * bs)
        # later model blocks are invisible to this one, so a prefix window would only recompute K/V
        # nothing reads before the next refresh: prefix and dual cache are the same (exact) window
        return start, min(n, max(blk[-1] + 1, (blk[-1] // bs + 1) * bs))

    def entry_window(self, window: tuple[int, int], previous: list[int]) -> tuple[int, int] | None:
        # that block's K/V were last written with some of it still masked; model blocks of context in between
        # were never computed
        return min(window[0], self._entry_start(previous)), window[1]

    def _entry_start(self, previous: list[int]) -> int:
        return previous[0] // self.block_size * self.block_size

    def visible(self, window: tuple[int, int], n: int, static_shapes: bool) -> int:
        # compiled engines keep whole-canvas refreshes, one graph shape per request
        return n if static_shapes else window[1]


class BlockCausalCausalBlocks(BlockCausal):
    """Block-causal with causal attention inside blocks: plain causal attention, with model blocks that only
    matter to prefix reuse. Nothing in a block sees what follows it, so decoding blocks may cross model blocks
    and a window ends with its block; with shifted logits it is an adapted AR model, which drafting reads."""

    left_to_right = True

    def __init__(self, block_size: int, logits_shift: bool):
        super().__init__(block_size, logits_shift)
        self.drafting = bool(logits_shift)

    def aligned(self, a: int, b: int) -> bool:
        return True

    def block_window(self, blk: list[int], n: int, cache: str) -> tuple[int, int]:
        return max(blk[0] - self.shift, 0), blk[-1] + 1  # the entry window renews the block before

    def _entry_start(self, previous: list[int]) -> int:
        return previous[0]


def layout_for(config: ModelConfig) -> AttentionLayout:
    """The layout of a model's attention mode (config.attention, config.block_attention)."""
    if config.attention == "bidirectional":
        kind = AttentionLayout
    elif config.attention == "causal":
        kind = Causal
    elif config.block_attention == "causal":
        kind = BlockCausalCausalBlocks
    else:
        kind = BlockCausal
    return kind(config.block_size, config.logits_shift)
