"""Load any checkpoint by its path: a model folder in Hugging Face layout (ours or a published family,
model/weights.py), an adaptation folder that takes most weights from its base (`base.json`, model/base.py),
or a `.gguf` file (model/gguf.py). Those modules know nothing of each other's formats; this one picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unmask.model.base import load_adaptation, read_base
from unmask.model.config import ModelConfig
from unmask.model.families import Family
from unmask.model.gguf import is_gguf, load_gguf_model, read_gguf_config, stores_q4
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


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               quantization: str | None = None) -> Transformer:
    """A model folder (ours or a published layout), an adaptation folder or a `.gguf` file. `quantization`
    applies to what comes from a GGUF (the file, or an adaptation's base), which loads straight into that
    layout; a folder's own weights are quantized after loading (unmask.load)."""
    path = Path(path)
    if _is_gguf_file(path):
        return load_gguf_model(path, device=device, dtype=dtype, quantization=quantization)
    if (path / BASE_FILE).is_file():  # an adaptation: the folder holds the adapter, the base the rest
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return load_adaptation(path, device, dtype, quantization)
    return load_folder(path, device=device, dtype=dtype)


def gguf_source(path: str | Path) -> Path | None:
    """The GGUF file a checkpoint's weights come from: the file itself, or an adaptation folder's base."""
    path = Path(path)
    if _is_gguf_file(path):
        return path
    if (path / BASE_FILE).is_file():
        return read_base(path).locate()
    return None


def auto_quantization(path: str | Path, device: torch.device) -> str | None:
    """The weight layout a checkpoint runs in when none is asked for: on a CPU, a GGUF whose layers are 4-bit
    blocks keeps them 4-bit (int4-g32, PyTorch's int4 kernel: the step reads a quarter of bf16's bytes and
    nothing is dequantized); everything else keeps its stored weights."""
    if device.type != "cpu":
        return None
    source = gguf_source(path)
    return "int4-g32" if source is not None and stores_q4(source) else None
