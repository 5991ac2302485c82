"""Model folders in Hugging Face layout: config.json, safetensors (sharded with model.safetensors.index.json
when large), tokenizer.json + tokenizer_config.json. model/checkpoints.py loads any checkpoint (this layout, a
`.gguf` file, an adaptation folder) on top of this module.

Loading builds the model on the meta device and assigns tensors read lazily (mmap) from the shards,
converted straight to the target dtype and device, so an 8B checkpoint never sits in memory twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unmask.errors import UnmaskError
from unmask.io import atomic_path, atomic_write_text
from unmask.model.config import ConfigError, ModelConfig
from unmask.model.families import Family, detect_family
from unmask.model.quantize import QuantizedEmbedding, fuse_projections, tie_head, ties_table
from unmask.model.transformer import Transformer

INDEX_FILE = "model.safetensors.index.json"
BASE_FILE = "base.json"  # model/base.py: a folder that stores only what an adaptation added to a base
SINGLE_FILE = "model.safetensors"


class CheckpointError(UnmaskError, RuntimeError):
    """A model folder that cannot be loaded: the message names the file and the problem."""


def save_model(model: Transformer, path: str | Path, max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None) -> None:
    """Write config.json and the weights, sharding at `max_shard_bytes` (each file written atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if is_tied_head(name, model.config):
            continue  # stored once, as the embedding table
        t = t.detach().to("cpu")
        tensors[name] = (t.to(dtype) if dtype is not None and in_compute_dtype(name, t) else t).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    written = []
    if len(shards) == 1:
        with atomic_path(path / SINGLE_FILE) as tmp:
            save_file(shards[0], str(tmp), metadata={"format": "pt"})
        written.append(path / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with atomic_path(path / fname) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
            written.append(path / fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        written.append(path / INDEX_FILE)
    # only now drop the files of an earlier save with another sharding: a save that fails half-way leaves
    # the previous weights loadable instead of a folder without any
    for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        if old not in written:
            old.unlink(missing_ok=True)
    cfg = {"model_type": "unmask", "architectures": ["UnmaskTransformer"], **model.config.to_dict()}
    atomic_write_text(path / "config.json", json.dumps(cfg, indent=2) + "\n")


def read_folder_config(path: str | Path) -> tuple[ModelConfig, Family, dict[str, Any]]:
    """(config, family, raw config.json) of a model folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model folder not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"not a model folder: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"no config.json in {path}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    try:
        family = detect_family(raw)
        config = family.to_config(raw)
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    return config, family, raw


def weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> file that holds it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid index: {e}") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(f"shard listed in {INDEX_FILE} is missing: {path / missing[0]}")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {path}")
    out = {}
    for f in files:
        for name in _open(f).keys():
            out[name] = f
    return out


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or bad headers
        raise CheckpointError(f"corrupt or unreadable shard {file}: {e}") from None


def _check_memory(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    need = config.num_params() * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return
    else:
        return
    if need > free:
        raise CheckpointError(
            f"not enough memory on {device}: the weights need {need / 2**30:.1f} GiB in {dtype}, "
            f"{free / 2**30:.1f} GiB free (try --dtype bfloat16 or another device)"
        )


def in_compute_dtype(name: str, t: torch.Tensor) -> bool:
    """Tensors that follow the model's compute dtype; quantized weights and their scales keep their own."""
    return t.dtype in (torch.float32, torch.bfloat16, torch.float16) and not name.endswith("weight_scale")


def tied_head(config: ModelConfig) -> bool:
    """The output head is the embedding table itself (model/quantize.py: under fp8 the head is a quantized
    copy of its own)."""
    return ties_table(config, config.quantization)


def is_tied_head(name: str, config: ModelConfig) -> bool:
    """A tensor of a head tied to the embedding, which checkpoints store once, as the embedding."""
    return name.startswith("output.") and tied_head(config)


def empty_model(config: ModelConfig) -> tuple[Transformer, dict[str, torch.Size]]:
    """The model on the meta device, and the shape of every tensor a checkpoint must supply (a tied head is
    the embedding, so it is not among them)."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: p.shape for name, p in model.state_dict().items() if not is_tied_head(name, config)}
    return model, expected


def assign_weights(model: Transformer, state: dict[str, torch.Tensor]) -> Transformer:
    """`model` (from empty_model) holding the tensors of `state` themselves, its head tied when configured."""
    model.load_state_dict(state, strict=False, assign=True)
    if tied_head(model.config):
        tie_head(model.output, model.tok_embeddings)
    if model.config.quantization:
        fuse_projections(model)  # over the loaded buffers
    return model.eval()


def _quantize_float_table(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """A quantized folder that stored its tied table in the compute dtype (before tables were stored int8):
    quantize it now, as a fresh save would."""
    table = model.tok_embeddings
    weight = state.get("tok_embeddings.weight")
    if isinstance(table, QuantizedEmbedding) and weight is not None and weight.is_floating_point():
        state["tok_embeddings.weight"], state["tok_embeddings.weight_scale"] = table.scheme.quantize(weight)


def load_folder(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
    """The model of a folder that holds all its weights (ours or a published layout)."""
    path = Path(path)
    config, family, _ = read_folder_config(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = weight_files(path)
    if dtype is None:
        name, file = next(iter(files.items()))
        try:
            dtype = _open(file).get_slice(name).get_dtype()
        except CheckpointError:
            raise
        except Exception as e:  # e.g. the index lists a tensor the shard does not hold
            raise CheckpointError(f"corrupt shard {file}: cannot read {name!r}: {e}") from None
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
        if device.type == "cpu":
            dtype = torch.float32  # CPUs run half-precision matmuls far slower than float32
    _check_memory(config, device, dtype)
    model, expected = empty_model(config)
    state: dict[str, torch.Tensor] = {}
    handles: dict[Path, Any] = {}
    for ckpt_name, file in files.items():
        try:
            name = family.our_name(ckpt_name)
        except KeyError:
            raise CheckpointError(f"{file.name}: unexpected tensor {ckpt_name!r} for a {family.name} model") from None
        if name is None or is_tied_head(name, config):
            continue  # dropped key, or a tied head some exporters also store
        if name not in expected and family.split is None:
            raise CheckpointError(f"{file.name}: tensor {ckpt_name!r} maps to {name!r}, which the model does not have")
        handle = handles.get(file) or handles.setdefault(file, _open(file))
        try:
            t = handle.get_tensor(ckpt_name)
        except Exception as e:
            raise CheckpointError(f"corrupt shard {file}: cannot read {ckpt_name!r}: {e}") from None
        if family.transform is not None:
            t = family.transform(ckpt_name, t)
        parts = family.split(name, t, config) if family.split is not None else {name: t}
        for name, t in parts.items():
            if name not in expected:
                raise CheckpointError(f"{file.name}: tensor {ckpt_name!r} maps to {name!r}, which the model does not have")
            if tuple(t.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"config.json does not match the weights: {ckpt_name!r} gives {name!r} the shape {tuple(t.shape)}, "
                    f"the config implies {tuple(expected[name])}"
                )
            if in_compute_dtype(name, t):
                state[name] = t.to(device=device, dtype=dtype)
            else:  # a copy of its own: tensors read from the file may be unaligned, which int8 kernels crash on
                state[name] = t.to(device=device, copy=True)
    _quantize_float_table(model, state)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"weights missing from {path}: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return assign_weights(model, state)
