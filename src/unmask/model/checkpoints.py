"""Load any checkpoint by its path: a model folder in Hugging Face layout (ours or a published family,
model/weights.py), an adaptation folder that takes most weights from its base (`base.json`, model/base.py),
or a `.gguf` file (model/gguf.py). Those modules know nothing of each other's formats; this one picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unmask.model.base import load_adaptation
from unmask.model.config import ModelConfig
from unmask.model.families import Family
from unmask.model.gguf import is_gguf, load_gguf_model, read_gguf_config
from unmask.model.transformer import Transformer
from unmask.model.weights import (BASE_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError, load_folder,  # noqa: F401
                                  read_folder_config, save_model, weight_files)


def _is_gguf_file(path: Path) -> bool:
    return is_gguf(path) and not path.is_dir()


def read_config(path: str | Path) -> tuple[ModelConfig, Family, dict[str, Any]]:
    """(config, family, raw config.json) of a model folder; for a `.gguf` file the raw dict is its metadata."""
    path = Path(path)
    if _is_gguf_file(path):
        return read_gguf_config(path)
    return read_folder_config(path)


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """A model folder (ours or a published layout), an adaptation folder or a `.gguf` file."""
    path = Path(path)
    if _is_gguf_file(path):
        return load_gguf_model(path, device=device, dtype=dtype)
    if (path / BASE_FILE).is_file():  # an adaptation: the folder holds the adapter, the base the rest
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return load_adaptation(path, device, dtype)
    return load_folder(path, device=device, dtype=dtype)
