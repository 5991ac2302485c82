"""The request queue that decodes a model: the diffusion Engine, or ARQueue for a causal AR twin. Both are
Decoders (decoding/contract.py), so the server and its benchmark serve either."""

from __future__ import annotations

import logging

from unmask.decoding.contract import Decoder
from unmask.decoding.layout import layout_for
from unmask.model.transformer import Transformer

log = logging.getLogger(__name__)


def request_queue(model: Transformer, max_batch: int = 8, max_queue: int = 64, compile: bool | str = False,
                  prefix_blocks: int = 0) -> Decoder:
    """`prefix_blocks`: the Engine's store of finished prompt blocks, where it applies (block_causal models,
    uncompiled); ignored elsewhere."""
    from unmask.decoding.ar import ARQueue
    from unmask.decoding.engine import Engine

    layout = layout_for(model.config)
    if not layout.diffusion:
        if compile:
            log.warning("--compile applies to the diffusion engine; this causal model decodes uncompiled")
        return ARQueue(model, max_batch=max_batch, max_queue=max_queue)
    reuse = prefix_blocks if layout.prefix_reuse and not compile else 0
    return Engine(model, max_batch=max_batch, max_queue=max_queue, compile=compile, prefix_blocks=reuse)
