"""Learning-rate multipliers (linear warmup, then cosine to min_lr_ratio, warmup-stable-decay, or constant),
and the step count that fits a wall-clock budget."""

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


class StepBudget:
    """Turns `minutes` of training into a step count. Of the steps it sees, the first `skip` are not timed
    (compilation, cache warm-up), the next ones are; then the total is fixed at what the remaining budget
    allows at that pace. The timed steps lie inside the lr warmup where it is long enough, so the schedule
    never changes its mind about a step already taken."""

    def __init__(self, minutes: float, warmup_steps: int, skip: int = 3, timed: int = 20):
        self.seconds = minutes * 60
        self.skip = skip
        self.timed = max(3, min(timed, warmup_steps - skip))
        self.seen = 0
        self.timed_seconds = 0.0
        self.pace = 0.0  # seconds per timed step, once planned

    def plan(self, step: int, step_seconds: float, spent: float) -> int | None:
        """After each step: `step` steps done, this one took `step_seconds`, `spent` seconds in all.
        Returns the total step count once the timing window is over, else None."""
        self.seen += 1
        if self.seen > self.skip:
            self.timed_seconds += step_seconds
        if self.seen < self.skip + self.timed:
            return None
        self.pace = self.timed_seconds / self.timed
        return step + max(0, int((self.seconds - spent) / max(self.pace, 1e-9)))
