"""Learning-rate multipliers: linear warmup, then cosine to min_lr_ratio, warmup-stable-decay, or constant."""

from __future__ import annotations

import math

from unmask.train.config import OptimConfig


def lr_multiplier(step: int, total: int, opt: OptimConfig) -> float:
    """Multiplier of opt.lr for optimizer step `step` (0-based)."""
    if opt.warmup_steps > 0 and step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return 1.0
    floor = opt.min_lr_ratio
    if opt.schedule == "cosine":
        span = max(1, total - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly over the last decay_fraction of the run
    decay_steps = max(1, int(round(total * opt.decay_fraction)))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * max(0.0, (total - step) / decay_steps)
