"""The training config: typed dataclasses loaded from YAML, with dotted `--set section.key=value` overrides.

Unknown keys and wrongly typed values are errors that name the key, so a typo never trains silently with a
default. The `model` section takes any ModelConfig field plus `shape` (a named preset from model.config.SHAPES);
the tokenizer fills vocab_size and the special ids.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unmask.errors import UnmaskError
from unmask.io import atomic_write_text
from unmask.model.config import ModelConfig

MODES = ("diffusion", "ar", "sft", "adapt")
SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # as unmask.pipeline.parse_dtype reads them


class TrainConfigError(UnmaskError, ValueError):
    pass


@dataclass
class DataConfig:
    corpus: str | None = None  # folder from `unmask corpus` (train.jsonl, val.jsonl, tokenizer/)
    train: str | None = None  # or explicit files: .jsonl / .txt / .bin token shard (sft: prompt/answer jsonl)
    val: str | None = None
    tokenizer: str | None = None  # folder with tokenizer.json; default <corpus>/tokenizer or init_from's
    text_field: str = "text"


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class CorpusConfig:
    """How `unmask corpus --recipe FILE` rebuilds data.corpus (and its tokenizer)."""

    packages: list[str] = field(default_factory=list)  # "name==version" pins (or stdlib module names)
    package_path: list[str] = field(default_factory=list)  # where pinned packages are installed (--target)
    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    val_fraction: float = 0.01
    vocab_size: int = 8192


@dataclass
class TrainConfig:
    out_dir: str = "runs/model"
    mode: str = "diffusion"  # diffusion | ar | sft | adapt (an AR model learning block diffusion, objective.py)
    init_from: str | None = None  # a model folder to start from (e.g. the AR twin, adapted to diffusion)
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    seq_len: int = 256
    batch_size: int = 32  # sequences per optimizer step, summed over all processes
    micro_batch_size: int | None = None  # sequences per forward per process; None = all of them (no accumulation)
    steps: int = 1000
    # train for this many minutes of step time instead (validation and checkpoints not counted): the first
    # steps are timed and `steps` is set from them, so the lr schedule ends when the budget does. Recipes
    # compared "at equal GPU minutes" use it.
    minutes: float | None = None
    eval_interval: int = 200  # 0: only at the end
    eval_sequences: int = 64  # validation windows per evaluation
    eval_samples: int = 4  # Monte-Carlo samples of the diffusion ELBO
    checkpoint_interval: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    device: str | None = None  # default: cuda when available
    dtype: str = "bfloat16"  # autocast dtype on CUDA (CPU trains in float32)
    cpu_autocast: bool = False  # bf16 autocast on CPU too (CPUs with AMX / AVX512-BF16 run it ~2x faster)
    compile: bool = False
    fsdp: bool = False  # shard parameters with FSDP2 (torchrun, large models) instead of DDP
    save_dtype: str | None = None  # dtype of the final weights (e.g. bfloat16); checkpoints stay float32
    max_shard_mb: int = 2048

    def validate(self) -> None:
        if self.mode not in MODES:
            raise TrainConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.optim.schedule not in SCHEDULES:
            raise TrainConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.optim.schedule!r}")
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("log_interval", "eval_sequences", "eval_samples"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0 (0: only at the end), got {getattr(self, name)}")
        if self.optim.warmup_steps < 0:
            raise TrainConfigError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        if not 0 < self.optim.decay_fraction <= 1:
            raise TrainConfigError(f"optim.decay_fraction must be in (0, 1], got {self.optim.decay_fraction}")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise TrainConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.optim.min_lr_ratio}")
        # checked now, not when the final weights are written after the whole run
        for name in ("dtype", "save_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise TrainConfigError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise TrainConfigError(f"minutes must be > 0, got {self.minutes}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise TrainConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        known = {f.name for f in dataclasses.fields(ModelConfig)} | {"shape"}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise TrainConfigError(f"unknown config key 'model.{unknown[0]}'")
        if not (self.data.corpus or self.data.train):
            raise TrainConfigError("no training data: set data.corpus or data.train")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise TrainConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainConfigError(f"unknown config key '{prefix}{unknown[0]}'")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
            continue
        if tp is float or (typing.get_origin(tp) is not None and float in typing.get_args(tp)):
            if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
        if not _type_ok(value, tp):
            name = getattr(tp, "__name__", str(tp))
            raise TrainConfigError(f"config key '{prefix}{key}' must be {name}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def apply_override(raw: dict, assignment: str) -> None:
    """`optim.lr=1e-3` -> raw["optim"]["lr"] = 0.001 (the value parsed as YAML)."""
    if "=" not in assignment:
        raise TrainConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> TrainConfig:
    raw: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"no such config file: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: the config must be a mapping of keys")
        raw.update(loaded)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        cfg = _build(TrainConfig, raw, "")
    except TrainConfigError as e:
        raise TrainConfigError(f"{path}: {e}" if path else str(e)) from None
    cfg.validate()
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
