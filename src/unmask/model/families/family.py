"""A checkpoint family: how one published config.json and its weight names map onto our Transformer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from unmask.model.config import ModelConfig
from unmask.model.transformer import Transformer


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[dict[str, Any]], bool]
    to_config: Callable[[dict[str, Any]], ModelConfig]
    # checkpoint name template -> our name template; "{}" is an index (the layer, then the expert for expert
    # tensors, in the same order on both sides); None drops the key
    name_map: dict[str, str | None] = field(default_factory=dict)
    # optional per-tensor fix-up (checkpoint name, tensor) -> tensor
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    # optional split of one mapped tensor into several of ours (our name, tensor, config) -> {our name: tensor},
    # e.g. a fused q/k/v projection; names it does not split come back as {name: tensor}
    split: Callable[[str, torch.Tensor, ModelConfig], dict[str, torch.Tensor]] | None = None

    def our_name(self, ckpt_name: str) -> str | None:
        """Map a checkpoint tensor name to ours; raise KeyError for names the family does not know."""
        if not self.name_map:
            return ckpt_name
        if ckpt_name in self.name_map:
            return self.name_map[ckpt_name]
        parts = ckpt_name.split(".")
        indices = [p for p in parts if p.isdigit()]
        template = ".".join("{}" if p.isdigit() else p for p in parts)
        if indices and template in self.name_map:
            target = self.name_map[template]
            return None if target is None else target.format(*indices)
        raise KeyError(ckpt_name)

    def ckpt_names(self, config: ModelConfig) -> dict[str, str]:
        """Our name -> checkpoint name for every tensor of a model with this config (for writing layouts)."""
        if not self.name_map:
            return {}
        with torch.device("meta"):
            ours = set(Transformer(config).state_dict())
        out = {}
        for src, dst in self.name_map.items():
            if dst is None:
                continue
            for idx in _index_tuples(src.count("{}"), config):
                if dst.format(*idx) in ours:
                    out[dst.format(*idx)] = src.format(*idx)
        if config.tie_embeddings:
            out.pop("output.weight", None)
        return out


def _index_tuples(n: int, config: ModelConfig) -> list[tuple[int, ...]]:
    if n == 0:
        return [()]
    if n == 1:
        return [(i,) for i in range(config.n_layers)]
    if n == 2:
        return [(i, e) for i in range(config.n_layers) for e in range(config.n_experts)]
    raise ValueError(f"name templates hold at most two indices (layer, expert), got {n}")


def _native_config(raw: dict[str, Any]) -> ModelConfig:
    data = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "torch_dtype")}
    return ModelConfig.from_dict(data)


NATIVE = Family(name="unmask", matches=lambda raw: raw.get("model_type", "unmask") == "unmask", to_config=_native_config)
