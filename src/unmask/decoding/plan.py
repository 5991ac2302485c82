"""What a request decodes, fixed when it is submitted: its blocks, what it reports, and every block's windows.

The plan is the request's own and never changes; the runner's part of a request is its `Slot` (cache row,
prefix-store fills), and the decoding progress is the Request's (decoding/request.py). Each of the three is
written by one owner: the plan by `make_plan`, the slot by the engine (its row) and the runner, the progress
by the request itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from unmask.decoding.layout import AttentionLayout, layout_for
from unmask.decoding.options import DecodeOptions
from unmask.model.config import ModelConfig

Window = tuple[int, int]  # half-open slot range [start, end) a step recomputes


def plan_blocks(mask_positions: list[int], block_length: int, config: ModelConfig) -> list[list[int]]:
    """Split masked positions into blocks of at most `block_length` consecutive masked positions. For
    block_causal models a block never crosses a model block boundary."""
    blocks: list[list[int]] = []
    layout = layout_for(config)
    for p in mask_positions:
        cur = blocks[-1] if blocks else None
        if cur is not None and len(cur) < block_length and layout.aligned(cur[0], p):
            cur.append(p)
        else:
            blocks.append([p])
    return blocks


@dataclass(frozen=True)
class Plan:
    blocks: list[list[int]]  # masked positions, decoded block by block
    region: tuple[int, int]  # what events and the result report: canvas[lo:hi]
    tail_start: int | None  # first position of a masked run reaching the canvas end (early stop applies there)
    cut_at_eos: bool  # generation: the result ends at the first EOS
    stop_when: Callable[[list[int]], bool] | None  # generation: True for a committed prefix = stop here
    prompt_tokens: int
    steps_budget: int  # per block, for the fixed policy
    windows: list[Window]  # per block: the slots a window step recomputes
    entry_windows: list[Window | None]  # per block: its first step's window (None: that step refreshes)
    visible: list[int]  # per block: slots [0, visible) can influence it; a refresh recomputes only those
    window_width: int  # compiled engines pad every window of the request to this width ...
    entry_width: int  # ... and every entry window to this one (0: uncompiled)


def make_plan(canvas: list[int], options: DecodeOptions, config: ModelConfig, layout: AttentionLayout,
              static_shapes: bool, region: tuple[int, int] | None = None, cut_at_eos: bool = False,
              stop_when: Callable[[list[int]], bool] | None = None) -> Plan:
    """The plan of a canvas whose masks are to be filled (`static_shapes`: a compiled engine)."""
    mask, n = config.mask_id, len(canvas)
    masks = [i for i, t in enumerate(canvas) if t == mask]
    blocks = plan_blocks(masks, options.block_length, config)
    tail_start = None
    if masks and masks[-1] == n - 1:
        tail_start = masks[-1]
        while tail_start - 1 >= 0 and canvas[tail_start - 1] == mask:
            tail_start -= 1
    total_steps = options.steps or len(masks)
    windows = [layout.block_window(b, n, options.cache) for b in blocks]
    entries = [None] + [layout.entry_window(w, prev) for w, prev in zip(windows[1:], blocks)]
    widths = (0, 0)
    if static_shapes:
        # one window width for all of the request's blocks (prefix windows shrink block by block): compiled
        # graphs keep their shapes instead of recompiling per block
        widths = (max((e - s for s, e in windows), default=0),
                  max((e - s for s, e in (w for w in entries if w is not None)), default=0))
    region = region or (0, n)
    return Plan(blocks, region, tail_start, cut_at_eos, stop_when, prompt_tokens=region[0],
                steps_budget=max(1, -(-total_steps // max(len(blocks), 1))), windows=windows,
                entry_windows=entries, visible=[layout.visible(w, n, static_shapes) for w in windows],
                window_width=widths[0], entry_width=widths[1])


@dataclass
class Slot:
    """The runner's part of a request: its cache row (set by the engine at admission) and, with a prefix
    store, the stored K/V copied in before its first pass and the prompt blocks to store after it."""

    row: int = -1
    prefix_fill: list | None = None
    prefix_new: range = range(0)
    first_window: Window | None = None  # a prefix hit: the first pass starts after the stored blocks
