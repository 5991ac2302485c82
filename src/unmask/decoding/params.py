"""Declared parameters of unmasking policies, and the error every decoding option raises.

A policy class lists its knobs as `Param`s (decoding/policies.py); DecodeOptions, the CLI and the server
read those declarations, so a new policy's knob is validated, documented and accepted everywhere without
being written down again. This module imports nothing of the decoding package: options.py and policies.py
both build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unmask.errors import UnmaskError


class OptionsError(UnmaskError, ValueError):
    pass


@dataclass(frozen=True)
class Param:
    """One number a policy reads from DecodeOptions: its name (a DecodeOptions field, or a key of
    `DecodeOptions.policy_params` for a policy that brings a new knob), default, bounds and a one-line help."""

    name: str
    default: float
    help: str
    kind: type = float  # float or int
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bounds(self) -> str:
        """The valid range in words: "in (0, 1]", ">= 0", "> 0"."""
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return "any number"

    def problem(self, value: object) -> str | None:
        """Why `value` is not valid for this parameter ("must be in (0, 1], got 1.5"), None if it is."""
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else f"must be {self.bounds()}, got {value!r}"
