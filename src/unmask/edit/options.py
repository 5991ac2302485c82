"""How an edit runs, beside the DecodeOptions of its denoising: one object, names that mean one thing.

`flag_below` is auto mode's threshold: a token whose probability given the rest of the text is below it
gets rewritten. It is not DecodeOptions.remask_below, self-correction's threshold inside one decoding run
(0.4), nor DecodeOptions.threshold, the decoder's confidence threshold; an edit refuses `remask_below`
as a keyword so that the old name cannot silently mean the other thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unmask.edit.spans import EditError

MODES = ("spans", "auto", "instruction")


@dataclass(frozen=True)
class EditOptions:
    mode: str = "spans"  # spans | auto | instruction (edit/editor.py)
    instruction: str | None = None  # instruction mode: what to do
    strength: float = 0.5  # instruction mode: the fraction of a region's tokens re-noised (SDEdit)
    flag_below: float = 0.05  # auto mode: rewrite tokens whose probability given the rest is below this
    neighbors: int = 0  # auto mode: tokens either side of a flagged one rewritten with it
    max_fraction: float = 0.1  # auto mode: at most this fraction of the tokens flagged per round
    max_rounds: int = 4  # auto mode: probe-and-rewrite rounds
    max_steps: int | None = None  # auto mode: stop once the rounds took this many denoising steps
    probe_stride: int | None = None  # auto mode: tokens masked apart in one probing pass (probe.py)
    extra_tokens: int | None = None  # masks beyond a region's own token count (default: half again, >= 2)
    length: str = "absorb"  # how a region's new length is chosen: absorb | search | fixed (fill.py)
    markers: bool = True  # <<< >>> in the text mark the regions
    suffix_scoring: bool | None = None  # models that read left to right: edit by suffix scoring (None: on)

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def replace(self, **changes: object) -> EditOptions:
        return dataclasses.replace(self, **changes)

    def check(self) -> EditOptions:
        """Refuse what would be silently wrong: a negative budget shrinks a region below its own size,
        probe_stride 0 probes nothing and flags every token, negative neighbors are ignored."""
        if self.mode not in MODES:
            raise EditError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, least in (("extra_tokens", 0), ("neighbors", 0), ("probe_stride", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise EditError(f"{name} must be >= {least}, got {value}")
        if self.mode == "instruction" and not (self.instruction or "").strip():
            raise EditError("instruction mode needs an instruction")
        if not 0.0 <= self.strength <= 1.0:
            raise EditError(f"strength must be in [0, 1], got {self.strength}")
        if not 0.0 < self.flag_below < 1.0:
            raise EditError(f"flag_below (--flag-below) must be in (0, 1), got {self.flag_below}")
        if self.max_rounds < 1:
            raise EditError(f"max_rounds must be >= 1, got {self.max_rounds}")
        return self


def split_options(edit: EditOptions | None, overrides: dict[str, object]) -> tuple[EditOptions, dict[str, object]]:
    """(the edit's options with its keywords applied, the keywords left for DecodeOptions)."""
    if "remask_below" in overrides:
        raise EditError("remask_below is self-correction's threshold inside a decoding run; auto mode's is "
                        "flag_below (--flag-below)")
    mine = {k: v for k, v in overrides.items() if k in EditOptions.fields()}
    rest = {k: v for k, v in overrides.items() if k not in mine}
    return (edit or EditOptions()).replace(**mine), rest
