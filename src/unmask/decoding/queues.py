"""The request queue that decodes a model: the diffusion Engine, or ARQueue for a causal AR twin. Both take
submit / step / cancel / has_work and report StepEvents, so the server and its benchmark serve either."""

from __future__ import annotations

import logging

from unmask.model.transformer import Transformer

log = logging.getLogger(__name__)


def request_queue(model: Transformer, max_batch: int = 8, max_queue: int = 64, compile: bool | str = False):
    from unmask.decoding.ar import ARQueue
    from unmask.decoding.engine import Engine

    if model.config.attention == "causal":
        if compile:
            log.warning("--compile applies to the diffusion engine; this causal model decodes uncompiled")
        return ARQueue(model, max_batch=max_batch, max_queue=max_queue)
    return Engine(model, max_batch=max_batch, max_queue=max_queue, compile=compile)
