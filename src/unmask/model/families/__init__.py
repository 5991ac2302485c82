"""Checkpoint families: how a published config.json and weight names map onto our Transformer.

A family is one small module with a `FAMILY` object; adding a family = adding a file and listing it here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from unmask.model.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[dict[str, Any]], bool]
    to_config: Callable[[dict[str, Any]], ModelConfig]
    # checkpoint name template -> our name template; "{}" is the layer index; None drops the key
    name_map: dict[str, str | None] = field(default_factory=dict)
    # optional per-tensor fix-up (checkpoint name, tensor) -> tensor
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def our_name(self, ckpt_name: str) -> str | None:
        """Map a checkpoint tensor name to ours; raise KeyError for names the family does not know."""
        if not self.name_map:
            return ckpt_name
        if ckpt_name in self.name_map:
            return self.name_map[ckpt_name]
        parts = ckpt_name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                template = ".".join(parts[:i] + ["{}"] + parts[i + 1 :])
                if template in self.name_map:
                    target = self.name_map[template]
                    return None if target is None else target.format(part)
        raise KeyError(ckpt_name)

    def ckpt_names(self, config: ModelConfig) -> dict[str, str]:
        """Our name -> checkpoint name for every tensor of a model with this config (for writing layouts)."""
        if not self.name_map:
            return {}
        out = {}
        for src, dst in self.name_map.items():
            if dst is None:
                continue
            if "{}" in src:
                for i in range(config.n_layers):
                    out[dst.format(i)] = src.format(i)
            else:
                out[dst] = src
        return out


def _native_config(raw: dict[str, Any]) -> ModelConfig:
    data = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return ModelConfig.from_dict(data)


NATIVE = Family(name="unmask", matches=lambda raw: raw.get("model_type", "unmask") == "unmask", to_config=_native_config)


def registered() -> list[Family]:
    families = [NATIVE]
    try:  # published layouts live in their own modules
        from unmask.model.families import published

        families = published.FAMILIES + families
    except ImportError:
        pass
    return families


def detect_family(raw: dict[str, Any]) -> Family:
    for family in registered():
        if family.matches(raw):
            return family
    raise ConfigError(
        f"config.json describes an unsupported model (model_type={raw.get('model_type')!r}, "
        f"architectures={raw.get('architectures')!r})"
    )
