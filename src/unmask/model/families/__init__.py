"""Checkpoint families: how a published config.json and weight names map onto our Transformer.

A family is one small module with a `FAMILY` object; adding a family = adding a file and listing it here.
A family module that fails to import fails the import of this package, by its own error.
"""

from __future__ import annotations

from typing import Any

from unmask.model.config import ConfigError
from unmask.model.families import published
from unmask.model.families.family import NATIVE, Family  # noqa: F401  (the package's API)


def registered() -> list[Family]:
    return published.FAMILIES + [NATIVE]


def detect_family(raw: dict[str, Any]) -> Family:
    for family in registered():
        if family.matches(raw):
            return family
    raise ConfigError(
        f"config.json describes an unsupported model (model_type={raw.get('model_type')!r}, "
        f"architectures={raw.get('architectures')!r})"
    )
